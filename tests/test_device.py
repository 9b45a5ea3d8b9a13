"""The bf16 probe: bf16 where the CPU computes it natively, fp32 elsewhere, and loads that follow it."""

from __future__ import annotations

import pytest
import torch

from idefics3 import Idefics3ForConditionalGeneration
from idefics3 import device as dev


def test_probe_reads_cpu_flags(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    avx512_bf16 = "fpu sse avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_bf16"
    fake.write_text(f"processor\t: 0\nflags\t\t: {avx512_bf16}\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    dev.cpu_has_bf16.cache_clear()
    try:
        assert dev.cpu_has_bf16() and dev.default_dtype("cpu") == torch.bfloat16
        fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
        dev.cpu_has_bf16.cache_clear()
        assert not dev.cpu_has_bf16() and dev.default_dtype("cpu") == torch.float32
        fake.write_text(f"processor\t: 0\nflags\t\t: {avx512_bf16}\n")
        monkeypatch.setenv("IDEFICS3_CPU_ISA", "avx2")  # behave as an AVX2 laptop: no bf16 instructions
        dev.cpu_has_bf16.cache_clear()
        assert not dev.cpu_has_bf16() and dev.default_dtype("cpu") == torch.float32
    finally:
        dev.cpu_has_bf16.cache_clear()


def test_isa_levels_and_forcing_a_lower_one(monkeypatch):
    flags = frozenset("fpu avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_tile amx_bf16".split())
    assert dev.detected_isa(flags) == "amx"
    assert dev.detected_isa(flags - {"amx_tile"}) == "avx512_bf16"
    assert dev.detected_isa(flags - {"avx512dq"}) == "avx2"  # AVX-512 counts only with all four parts
    assert dev.detected_isa(frozenset({"fpu", "asimd", "bf16"})) == "none"  # ARM: the plain path
    monkeypatch.setattr(dev, "cpu_flags", lambda: flags)
    assert dev.cpu_isa() == "amx" and "amx_bf16" in dev.isa_flags()
    monkeypatch.setenv("IDEFICS3_CPU_ISA", "AVX2")
    assert dev.cpu_isa() == "avx2"
    assert "avx2" in dev.isa_flags() and not dev.isa_flags() & {"avx512f", "avx512_bf16", "amx_bf16"}
    assert "limited to avx2 by IDEFICS3_CPU_ISA" in dev.cpu_description()
    monkeypatch.setenv("IDEFICS3_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="IDEFICS3_CPU_ISA='sse9' is not one of none, avx2"):
        dev.cpu_isa()
    monkeypatch.setattr(dev, "cpu_flags", lambda: flags - {"amx_tile", "amx_bf16"})
    monkeypatch.setenv("IDEFICS3_CPU_ISA", "amx")
    with pytest.raises(ValueError, match="more than this CPU has .it stops at avx512_bf16"):
        dev.cpu_isa()


def test_auto_dtype_falls_back_to_fp32_without_bf16(monkeypatch, tmp_path, tiny_checkpoint):
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")  # a checkpoint saved in bf16, like the Hub's
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "bf16").dtype == torch.float32
    # an explicit request is honoured
    assert Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype="bf16").dtype == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
