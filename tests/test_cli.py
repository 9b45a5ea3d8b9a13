"""The `idefics3` command line, run as a subprocess on the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

NEW = 6


def cli(*args: str, stdin: str | None = None, model: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "IDEFICS3_MODEL": model or "", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "idefics3.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def expected_answer(checkpoint, messages, images, new=NEW, processor_overrides=None, dtype=None, **settings) -> str:
    """What the CLI should print for a conversation, computed in-process with our library: greedy unless
    `settings` ask for sampling (passed to model.generate as the CLI passes them), decoded as the CLI decodes
    (special tokens skipped, leading space stripped)."""
    from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor, load_image

    processor = Idefics3Processor.from_pretrained(checkpoint, **(processor_overrides or {}))
    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint, **({"dtype": dtype} if dtype else {})).eval()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[load_image(str(p)) for p in images] or None, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=new, **settings)
    new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return processor.tokenizer.decode(new_ids, skip_special_tokens=True).lstrip()


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def test_generate_streams_the_greedy_answer(tiny_checkpoint, image_file):
    res = cli("generate", "--model", str(tiny_checkpoint), "--image", str(image_file), "--max-new-tokens", str(NEW),
              "What is in this image?")
    assert res.returncode == 0, res.stderr
    want = expected_answer(tiny_checkpoint, [user("What is in this image?", 1)], [image_file])
    assert res.stdout == want + "\n"


def test_generate_samples_what_generate_samples_with_the_same_seed(tiny_checkpoint, image_file):
    """A seeded sampling run of the CLI prints exactly the in-process sample for that seed (and the seed matters)."""
    new, seed = 8, 1
    res = cli("generate", "--image", str(image_file), "--max-new-tokens", str(new), "--temperature", "0.8",
              "--top-p", "0.9", "--seed", str(seed), "--no-split", "--longest-edge", "32", "--dtype", "fp32",
              "--device", "cpu", "Look: <image> what is it?", model=str(tiny_checkpoint))
    assert res.returncode == 0, res.stderr
    # The CLI's settings for these flags (cli.generation_settings) and processor overrides (cli.load_processor).
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                             {"type": "text", "text": " what is it?"}]}]
    overrides = {"size": {"longest_edge": 32}, "do_image_splitting": False}

    def sample(seed: int) -> str:
        return expected_answer(tiny_checkpoint, messages, [image_file], new=new, processor_overrides=overrides,
                               dtype="fp32", do_sample=True, temperature=0.8, top_p=0.9, seed=seed)

    want = sample(seed)
    assert res.stdout == want + "\n"
    assert want != expected_answer(tiny_checkpoint, messages, [image_file], new=new, processor_overrides=overrides,
                                   dtype="fp32")  # greedy
    assert sample(seed) == want and sample(seed + 1) != want  # seeded: reproducible, and another seed differs


def test_chat_through_stdin(tiny_checkpoint, image_file):
    script = (f"Hello there\n/image {image_file}\nWhat is in it?\n/image /no/such.png\n/frobnicate\n/reset\n"
              "Again\n/quit\nnever\n")
    res = cli("chat", "--model", str(tiny_checkpoint), "--max-new-tokens", str(NEW), stdin=script)
    assert res.returncode == 0, res.stderr
    first = expected_answer(tiny_checkpoint, [user("Hello there")], [])
    history = [user("Hello there"), {"role": "assistant", "content": [{"type": "text", "text": first}]}]
    second = expected_answer(tiny_checkpoint, [*history, user("What is in it?", 1)], [image_file])
    third = expected_answer(tiny_checkpoint, [user("Again")], [])  # after /reset: no history
    assert res.stdout == f"{first}\n{second}\n{third}\n"
    assert "image attached" in res.stderr and "/no/such.png" in res.stderr
    assert "unknown command /frobnicate" in res.stderr and "cleared" in res.stderr
    assert "Traceback" not in res.stderr


def test_info(tiny_checkpoint):
    res = cli("info", "--model", str(tiny_checkpoint))
    assert res.returncode == 0, res.stderr
    assert "4 tokens per tile" in res.stdout and "parameters:" in res.stdout
    assert "up to 5 tiles x 4 = 20 image tokens" in res.stdout
    res = cli("info", "--model", str(tiny_checkpoint), "--no-split")
    assert "up to 1 tile x 4 = 4 image tokens" in res.stdout


def test_info_shows_the_kernel_backend_choices(tiny_checkpoint):
    res = cli("info", "--model", str(tiny_checkpoint), "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert "kernels:" in res.stdout and "torch 2." in res.stdout and "dtype float32" in res.stdout
    for op in ("vision layers:", "vision attention:", "prefill attention:", "quantised prefill:", "decode:",
               "derived weights:"):
        assert op in res.stdout, op
    assert "no kernel for torch.float32" in res.stdout  # the attention kernels are bf16 only: the reason shows
    off = subprocess.run([sys.executable, "-m", "idefics3.cli", "info", "--model", str(tiny_checkpoint)],
                         capture_output=True, text=True, env={**os.environ, "IDEFICS3_KERNELS": "0"})
    assert off.stdout.count("IDEFICS3_KERNELS=0") == 5, off.stdout
    assert "kernels:" not in cli("info", "--model", str(tiny_checkpoint), "--no-backend").stdout


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "not a checkpoint", "no such folder",
                                  "unknown flag", "image count", "bad number"])
def test_bad_input_is_one_line_and_nonzero(case, tiny_checkpoint, image_file, tmp_path):
    model = str(tiny_checkpoint)
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    args = {
        "missing image": ["generate", "--model", model, "--image", str(tmp_path / "nope.jpg"), "hi"],
        "unreadable image": ["generate", "--model", model, "--image", str(text_file), "hi"],
        "not a checkpoint": ["generate", "--model", str(tmp_path), "hi"],
        "no such folder": ["info", "--model", str(tmp_path / "missing" / "model")],
        "unknown flag": ["generate", "--model", model, "--frobnicate", "hi"],
        "image count": ["generate", "--model", model, "--image", str(image_file), "<image> and <image>?"],
        "bad number": ["generate", "--model", model, "--max-new-tokens", "many", "hi"],
    }[case]
    res = cli(*args)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idefics3: error:"), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    res = cli("info", "--model", str(tmp_path), "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_finetune_and_merge_are_subcommands(tmp_path):
    for command in ("finetune", "merge"):
        out = cli(command, "--help")
        assert out.returncode == 0 and f"usage: idefics3 {command}" in out.stdout
    out = cli("merge", "--model", str(tmp_path / "absent"), "--adapter", str(tmp_path / "a"), "--output",
              str(tmp_path / "m"))
    assert out.returncode == 1 and "adapter_config.json" in out.stderr and "Traceback" not in out.stderr


def test_without_model_the_built_in_demo_model_is_used():
    import idefics3

    out = cli("info")
    assert out.returncode == 0, out.stderr
    assert str(idefics3.DEMO_MODEL) in out.stdout or "demo" in out.stdout
