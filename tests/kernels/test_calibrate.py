"""The attention implementations are chosen by timing them on this machine, and the reason says so."""

from __future__ import annotations

import torch

from idefics3.kernels import calibrate


def test_verdict_names_the_timings_and_is_remembered(monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})
    slow = lambda: calls.append("ours") or __import__("time").sleep(0.004) or 1  # noqa: E731
    fast = lambda: calls.append("sdpa") or 1  # noqa: E731
    verdict = calibrate._compare(("k",), slow, fast, "a test shape")
    assert not verdict.ours and "SDPA faster" in verdict.reason and "a test shape" in verdict.reason
    n = len(calls)
    assert calibrate._compare(("k",), slow, fast, "a test shape") is verdict and len(calls) == n  # not re-timed
    assert calibrate._compare(("k2",), fast, slow, "x").ours


def test_a_declining_kernel_loses(monkeypatch):
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})
    verdict = calibrate._compare(("d",), lambda: None, lambda: 1, "fp32 inputs")
    assert not verdict.ours and "declines" in verdict.reason


def test_switch_off_takes_the_kernel(monkeypatch):
    monkeypatch.setenv("IDEFICS3_CALIBRATE", "0")
    assert calibrate.vision_attention(2, 16, 8, torch.bfloat16).ours
    assert calibrate.prefill_attention(2, 1, 8, torch.bfloat16).ours


def test_real_measurement_picks_one(monkeypatch):
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})
    verdict = calibrate.prefill_attention(4, 2, 64, torch.bfloat16, tokens=64)
    assert verdict.reason  # either way, with its reason
