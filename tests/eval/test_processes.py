"""The run as separate processes: the engine's answers equal the one-at-a-time reference; a run stopped by Ctrl-C
and then killed outright, resumed each time, ends with the records and scores of one uninterrupted run; and two
torchrun ranks on gloo give exactly what one process gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import idefics3
from idefics3.cli import main

pytestmark = pytest.mark.skipif(not (idefics3.DEMO_MODEL / "config.json").is_file(), reason="no built-in model")
COUNT = 96
ARGS = ["--task", "shapes", "--count", str(COUNT), "--seed", "1000", "--dtype", "fp32", "--threads", "1",
        "--no-progress", "--model", str(idefics3.DEMO_MODEL)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "shapes-seed1000.jsonl").read_text().splitlines()]


def answers(folder: Path) -> list[tuple[str, str, float]]:
    return [(r["id"], r["answer"], r["score"]) for r in records(folder)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["eval", *ARGS, "-o", str(out)]) == 0
    return out


def test_engine_answers_equal_the_sequential_reference(reference):
    from idefics3.demo.evaluate import evaluate

    model = idefics3.load_model(idefics3.DEMO_MODEL, dtype="fp32")
    processor = idefics3.load_processor(idefics3.DEMO_MODEL)
    sequential = evaluate(model, processor, seed=1000, count=COUNT)
    assert [r.got for r in sequential.records] == [a for _, a, _ in answers(reference)]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "idefics3.eval", *ARGS, "-o", str(out), "--resume"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(proc: subprocess.Popen, part: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if part.is_file() and part.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {n} records: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("no progress")


def test_ctrl_c_then_a_kill_then_resume_gives_the_uninterrupted_results(tmp_path, reference):
    out = tmp_path / "out"
    part = out / "shapes-seed1000.part0.jsonl"
    proc = _start(out)
    _wait_for_lines(proc, part, 16)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: what was written stays
    assert proc.wait(60) == 130
    first = part.read_bytes().count(b"\n")
    assert 16 <= first < COUNT
    proc = _start(out)
    _wait_for_lines(proc, part, first + 16)
    proc.kill()  # a crash: no handler runs
    proc.wait(60)
    assert main(["eval", *ARGS, "-o", str(out), "--resume"]) == 0
    assert answers(out) == answers(reference)
    got = json.loads((out / "shapes-seed1000.json").read_text())
    want = json.loads((reference / "shapes-seed1000.json").read_text())
    assert got["score"] == want["score"] and got["breakdown"] == want["breakdown"] and got["samples"] == COUNT


def test_two_torchrun_ranks_on_gloo_equal_one_process(tmp_path, reference):
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "idefics3.eval", *ARGS, "-o", str(out)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert answers(out) == answers(reference)
    got = json.loads((out / "shapes-seed1000.json").read_text())
    want = json.loads((reference / "shapes-seed1000.json").read_text())
    assert got["world_size"] == 2 and got["score"] == want["score"] and got["breakdown"] == want["breakdown"]
    assert not list(out.glob("*.part*.jsonl"))
    assert done.stdout.count("demo shapes") == 1  # only rank 0 prints the table
