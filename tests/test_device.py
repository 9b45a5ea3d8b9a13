"""The bf16 probe: bf16 where the CPU computes it natively, fp32 elsewhere, and loads that follow it."""

from __future__ import annotations

import torch

from idefics3 import Idefics3ForConditionalGeneration
from idefics3 import device as dev


def test_probe_reads_cpu_flags(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    dev.cpu_has_bf16.cache_clear()
    try:
        assert dev.cpu_has_bf16() and dev.default_dtype("cpu") == torch.bfloat16
        fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
        dev.cpu_has_bf16.cache_clear()
        assert not dev.cpu_has_bf16() and dev.default_dtype("cpu") == torch.float32
    finally:
        dev.cpu_has_bf16.cache_clear()


def test_auto_dtype_falls_back_to_fp32_without_bf16(monkeypatch, tmp_path, tiny_checkpoint):
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")  # a checkpoint saved in bf16, like the Hub's
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "bf16").dtype == torch.float32
    # an explicit request is honoured
    assert Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype="bf16").dtype == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
