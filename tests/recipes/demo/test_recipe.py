"""The demo recipe, run as documented (`python -m recipes.demo.recipe` from the repository root): its flags, and
every stage end to end at toy scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipes.demo.conversations import DESCRIBE
from recipes.demo.recipe import REPLAY

ROOT = Path(__file__).resolve().parents[3]


def recipe(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "recipes.demo.recipe", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("flags, problem", [(["--heads", "6", "--kv-heads", "4"], "must divide --heads 6"),
                                            (["--replay", "1"], "--replay 1.0 is a share")])
def test_recipe_rejects_bad_flags_before_any_work(tmp_path, flags, problem):
    res = recipe(str(tmp_path / "w"), *flags, timeout=60)
    assert res.returncode == 2 and problem in res.stderr and not (tmp_path / "w").exists()


def test_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    """The same command as the real recipe, with 24 chats and 2 steps per stage: a loadable model comes out."""
    flags = [str(tmp_path), "--count", "24", "--steps", "2", "--warmup-steps", "2", "--edge-steps", "2",
             "--compare-steps", "2", "--focus-steps", "2", "--polish-steps", "2"]
    res = recipe(*flags)
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
    res = recipe(*flags, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("idefics3.finetune finetune") == 1
    assert "--output " + str(tmp_path / "polished") in res.stdout
    assert "data and initial checkpoint" not in res.stdout  # the trained stages' data is not written again
    out = tmp_path / "model"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    info = subprocess.run([sys.executable, "-m", "idefics3.cli", "info"], capture_output=True, text=True,
                          env={**os.environ, "IDEFICS3_MODEL": str(out), "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert info.returncode == 0 and "up to 17 tiles x 1 = 17 image tokens" in info.stdout, info.stdout + info.stderr
