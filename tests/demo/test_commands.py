"""`idefics3 demo`, `idefics3 eval` and the packaged model folder, end to end (the recipe: tests/recipes/demo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import idefics3

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
