"""The command line's quantisation and GGUF paths: `idefics3 quantize` writes a folder that `--model` takes
anywhere, `--quantize` quantises while loading, `--model x.gguf --mmproj y.gguf` answers about an image, and
each prints what the same model answers in-process; bad input is one line and a non-zero status."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from PIL import Image

from idefics3 import Idefics3ForConditionalGeneration, load_image
from idefics3.config import Idefics3Config
from idefics3.loading import load_processor
from idefics3.model.idefics3 import Idefics3
from quant.gguf_files import write_mmproj, write_text
from test_cli import NEW, cli, user

QUESTION = "What is in this image?"


def in_process(model_ref, image, mmproj=None, **load) -> str:
    """The greedy answer the CLI should print, computed with the library."""
    processor = load_processor(model_ref, mmproj=mmproj)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_ref, mmproj=mmproj, **load).eval()
    prompt = processor.apply_chat_template([user(QUESTION, 1)], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[load_image(str(image))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True
                                      ).lstrip()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_quantize_writes_a_folder_generate_and_info_take(tmp_path, tiny_checkpoint, image_file):
    out = tmp_path / "int4"
    res = cli("quantize", "--model", str(tiny_checkpoint), "--bits", "4", "--include-vision", "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "int4-g32" in res.stdout and "MiB ->" in res.stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert any("vision_model" in name for name in config["modules"])
    res = cli("generate", "--model", str(out), "--dtype", "fp32", "--image", str(image_file), "--max-new-tokens",
              str(NEW), QUESTION)
    assert res.returncode == 0, res.stderr
    assert res.stdout == in_process(out, image_file, dtype="fp32") + "\n"
    res = cli("info", "--model", str(out))
    assert res.returncode == 0, res.stderr
    assert "quantised:" in res.stdout and "int4-g32" in res.stdout


def test_quantize_flag_quantises_while_loading(tiny_checkpoint, image_file):
    res = cli("generate", "--model", str(tiny_checkpoint), "--quantize", "int8", "--dtype", "fp32", "--image",
              str(image_file), "--max-new-tokens", str(NEW), QUESTION)
    assert res.returncode == 0, res.stderr
    assert res.stdout == in_process(tiny_checkpoint, image_file, quantize="int8", dtype="fp32") + "\n"


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    from checkpoints import tiny_config

    folder = tmp_path_factory.mktemp("gguf")
    config = Idefics3Config.from_dict({**tiny_config(text=dict(intermediate_size=96)), "model_type": "idefics3"})
    torch.manual_seed(4)
    model = Idefics3(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.08)
    state = model.state_dict()
    text, mmproj = folder / "tiny-Q4_0.gguf", folder / "mmproj-tiny-Q8_0.gguf"
    types = {f"blk.{i}.{n}.weight": T.Q4_0 for i in range(3)
             for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    write_text(text, state, config, {"token_embd.weight": T.Q8_0, "output.weight": T.Q8_0, **types})
    write_mmproj(mmproj, state, config, {"mm.model.fc.weight": T.Q8_0})
    return text, mmproj


def test_a_gguf_pair_answers_about_an_image_and_converts_to_a_folder(tmp_path, gguf_pair, image_file):
    text, mmproj = gguf_pair
    want = in_process(text, image_file, mmproj=mmproj, dtype="fp32")
    res = cli("generate", "--model", str(text), "--mmproj", str(mmproj), "--dtype", "fp32", "--image",
              str(image_file), "--max-new-tokens", str(NEW), QUESTION)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    res = cli("quantize", "--model", str(text), "--mmproj", str(mmproj), "--output", str(tmp_path / "conv"))
    assert res.returncode == 0, res.stderr
    assert "not requantised" in res.stdout
    res = cli("generate", "--model", str(tmp_path / "conv"), "--dtype", "fp32", "--image", str(image_file),
              "--max-new-tokens", str(NEW), QUESTION)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    res = cli("generate", "--model", str(text), "--image", str(image_file), QUESTION)  # no --mmproj: text only
    assert res.returncode == 1 and "vision tower" in res.stderr


@pytest.mark.parametrize("case", ["output-not-empty", "already-quantised", "bad-format", "mmproj-without-gguf"])
def test_bad_quantisation_input_is_one_line(case, tmp_path, tiny_checkpoint, image_file):
    if case == "output-not-empty":
        (tmp_path / "x.txt").write_text("keep me")
        res = cli("quantize", "--model", str(tiny_checkpoint), "--output", str(tmp_path))
        match = "not an empty folder"
        assert (tmp_path / "x.txt").read_text() == "keep me"
    elif case == "already-quantised":
        assert cli("quantize", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "q")).returncode == 0
        res = cli("quantize", "--model", str(tmp_path / "q"), "--output", str(tmp_path / "qq"))
        match = "already quantised"
    elif case == "bad-format":
        res = cli("generate", "--model", str(tiny_checkpoint), "--quantize", "int3", "hello")
        match = "unknown quantisation 'int3'"
    else:
        res = cli("generate", "--model", str(tiny_checkpoint), "--mmproj", str(image_file), "hello")
        match = "go with a GGUF text model (a .gguf file)"
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idefics3: error:") and match in lines[0], res.stderr
