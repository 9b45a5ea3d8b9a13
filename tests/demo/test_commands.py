"""`idefics3 demo`, `idefics3 eval`, the packaged model folder and the recipe, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import idefics3
from idefics3.demo.conversations import DESCRIBE
from idefics3.demo.recipe import MODEL_FILES, REPLAY

HAS_MODEL = (idefics3.DEMO_MODEL / "config.json").is_file()
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="no built-in model")


def cli(*args: str, model: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "IDEFICS3_MODEL": model, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "idefics3.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_lists_demo_and_eval():
    res = cli("--help")
    assert "demo" in res.stdout and "eval" in res.stdout


@needs_model
def test_packaged_folder_is_complete_and_small():
    folder = idefics3.DEMO_MODEL
    names = {p.name for p in folder.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.json", "preprocessor_config.json", "processor_config.json"):
        assert name in names
    assert names <= set(MODEL_FILES)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20
    assert json.loads((folder / "config.json").read_text())["model_type"] == "idefics3"


@needs_model
def test_demo_writes_images_and_answers_with_timings(tmp_path):
    res = cli("demo", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("Q: ") == 6 and res.stdout.count(" ms; expected ") == 6
    assert str(idefics3.DEMO_MODEL) in res.stdout  # the default model
    assert len(list(tmp_path.glob("*.png"))) == 7  # one scene per type, two for the two-image question


@needs_model
def test_eval_prints_accuracy_per_type():
    res = cli("eval", "--count", "12", "--seed", "3", "--threads", "1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for kind in ("colour", "shape", "count", "position", "word", "two", "all"):
        assert any(line.startswith(kind) and line.rstrip().endswith(("%", "question)")) for line in lines), kind


def test_eval_rejects_a_bad_count():
    res = cli("eval", "--count", "0", model=str(idefics3.DEMO_MODEL))
    assert res.returncode != 0 and res.stderr.startswith("idefics3: error:")


@pytest.mark.parametrize("flags, problem", [(["--heads", "6", "--kv-heads", "4"], "must divide --heads 6"),
                                            (["--replay", "1"], "--replay 1.0 is a share")])
def test_recipe_rejects_bad_flags_before_any_work(tmp_path, flags, problem):
    res = subprocess.run([sys.executable, "-m", "idefics3.demo.recipe", str(tmp_path / "w"), *flags],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and problem in res.stderr and not (tmp_path / "w").exists()


def test_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    """The same command as the real recipe, with 24 chats and 2 steps per stage: a loadable model comes out."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "idefics3.demo.recipe", str(tmp_path), "--count", "24", "--steps", "2",
           "--warmup-steps", "2", "--edge-steps", "2", "--compare-steps", "2", "--focus-steps", "2", "--polish-steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = ["stage1", "trained", "edges", "compared", "focused", "polished"]
    assert res.stdout.count("idefics3.finetune finetune") == len(stages)
    for stage, data in zip(stages, ["warmup", "train", "edges", "compare", "focus", "polish"]):
        assert (tmp_path / stage / "model.safetensors").is_file() and (tmp_path / "data" / f"{data}.jsonl").is_file()
    edges = [json.loads(line) for line in (tmp_path / "data" / "edges.jsonl").read_text().splitlines()]
    assert len(edges) == 2 * 16 and all("on the" in m["content"][-1]["text"] for e in edges
                                        for m in e["messages"] if m["role"] == "user")
    # the comparison stage replays the main mix: REPLAY of its chats describe a scene or show two images
    compare = [json.loads(line)["messages"] for line in (tmp_path / "data" / "compare.jsonl").read_text().splitlines()]
    replayed = [m for m in compare if m[-2]["content"][-1]["text"] == DESCRIBE
                or sum(p["type"] == "image" for p in m[0]["content"]) == 2]
    assert len(compare) == 2 * 16 and len(replayed) == round(2 * 16 * REPLAY) > 0
    # --resume keeps what is trained: only the stage whose weights are gone runs again
    (tmp_path / "polished" / "model.safetensors").unlink()
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("idefics3.finetune finetune") == 1 and "--output " + str(tmp_path / "polished") in res.stdout
    assert "data and initial checkpoint" not in res.stdout  # the trained stages' data is not written again
    out = tmp_path / "model"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    res = cli("info", model=str(out))
    assert res.returncode == 0 and "up to 17 tiles x 1 = 17 image tokens" in res.stdout, res.stdout + res.stderr
