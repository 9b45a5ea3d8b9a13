"""Each fast path is chosen by timing it on this machine: a slowed candidate is never chosen, a verdict is cached
per CPU model, torch version and shape (and reused), and another CPU or torch recalibrates."""

from __future__ import annotations

import json
import time

import pytest
import torch

from idefics3.kernels import calibrate


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No remembered verdicts, a cache folder of our own."""
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})
    monkeypatch.setenv("IDEFICS3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("IDEFICS3_CALIBRATE", raising=False)
    return tmp_path


def timed(calls: list, name: str, delay: float = 0.0):
    def fn():
        calls.append(name)
        if delay:
            time.sleep(delay)
        return 1
    return fn


def test_a_slowed_candidate_is_never_chosen(fresh):
    calls = []
    verdict = calibrate.compare(("op",), timed(calls, "ours", 0.004), timed(calls, "sdpa"), "a test shape")
    assert not verdict.ours and "SDPA faster" in verdict.reason and "a test shape" in verdict.reason
    assert calibrate.compare(("op2",), timed(calls, "ours"), timed(calls, "sdpa", 0.004), "x").ours


def test_a_cached_choice_is_reused_and_another_machine_recalibrates(fresh, monkeypatch):
    calls = []
    first = calibrate.compare(("op",), timed(calls, "ours", 0.003), timed(calls, "sdpa"), "x")
    n = len(calls)
    assert calibrate.compare(("op",), timed(calls, "ours"), timed(calls, "sdpa"), "x") == first  # this process
    assert len(calls) == n
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})  # a new process: read back from the file
    again = calibrate.compare(("op",), timed(calls, "ours"), timed(calls, "sdpa"), "x")
    assert again == first and len(calls) == n
    saved = json.loads(calibrate.cache_file().read_text())
    assert any("torch" in key for key in saved)
    monkeypatch.setattr(calibrate, "machine", lambda: "Another CPU | torch 9.9")  # another CPU or torch
    changed = calibrate.compare(("op",), timed(calls, "ours"), timed(calls, "sdpa", 0.003), "x")
    assert len(calls) > n and changed.ours


def test_the_fastest_of_several_is_chosen_and_remembered(fresh, monkeypatch):
    calls = []
    candidates = {"a": timed(calls, "a", 0.003), "b": timed(calls, "b"), "c": timed(calls, "c", 0.002)}
    choice, reason = calibrate.fastest(("op3",), candidates, "a test shape")
    assert choice == "b" and "b fastest" in reason and all(f"{n} " in reason for n in "abc")
    n = len(calls)
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})  # a new process: read back from the file
    assert calibrate.fastest(("op3",), candidates, "a test shape") == (choice, reason) and len(calls) == n
    # another set of candidates is another question
    assert calibrate.fastest(("op3",), {"a": timed(calls, "a"), "c": timed(calls, "c", 0.003)}, "x")[0] == "a"


def test_a_broken_cache_file_is_measured_again(fresh):
    calibrate.cache_file().write_text("{not json")
    calls = []
    calibrate.compare(("op",), timed(calls, "ours"), timed(calls, "sdpa"), "x")
    assert calls and json.loads(calibrate.cache_file().read_text())


def test_a_declining_kernel_loses(fresh):
    verdict = calibrate.compare(("d",), lambda: None, lambda: 1, "fp32 inputs")
    assert not verdict.ours and "declines" in verdict.reason


def test_switch_off_takes_the_kernel(fresh, monkeypatch):
    monkeypatch.setenv("IDEFICS3_CALIBRATE", "0")
    assert calibrate.vision_attention(2, 16, 8, torch.bfloat16).ours
    assert calibrate.prefill_attention(2, 1, 8, torch.bfloat16).ours
    assert not calibrate.cache_file().exists()


def test_real_measurement_picks_one(fresh):
    verdict = calibrate.prefill_attention(4, 2, 64, torch.bfloat16, tokens=64)
    if verdict.ours or "declines" not in verdict.reason:  # measured: both timings and the winner are stated
        assert "ours" in verdict.reason and "SDPA" in verdict.reason
        assert ("ours faster" in verdict.reason) == verdict.ours


def test_the_backend_states_its_measured_choices(fresh, tiny_checkpoint):
    from idefics3 import Idefics3ForConditionalGeneration
    from idefics3.device import cpu_has_bf16
    from idefics3.kernels.backend import install_backend

    if not cpu_has_bf16():
        pytest.skip("the fused paths need bf16 instructions")
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    lines = "\n".join(install_backend(model, "auto").describe())
    assert "vision layers" in lines and "measured on one encoder layer" in lines
    assert calibrate.cache_file().exists()
