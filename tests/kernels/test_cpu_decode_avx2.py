"""The AVX2 + FMA + F16C build of the fused decode step (cpu_decode_avx2.cpp) against the plain cached forward.

The machine is made to look like one that stops at AVX2 (IDEFICS3_CPU_ISA=avx2), so `variant_for` picks this
build for both dtypes; it then runs the same checks as test_cpu_decode.py (whose tiny models, shapes and
prefill it reuses): fp32 logits within 1e-5 of the logit scale with the same greedy tokens, bf16 within 3%
(teacher-forced), the cache writes, batch 1 without slots, batches in non-ordered slots over more rows than
one pass of the row block, the `shared` prompt prefix, every head size the Python side accepts. The library
must contain no AVX-512 instruction. Skipped on CPUs without AVX2, FMA and F16C.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from idefics3 import device
from idefics3.device import cpu_flags
from idefics3.kernels import cpu_decode
from idefics3.kernels.cpu_decode import SUPPORTED_HEAD_DIMS, CpuDecoder, DecoderParts, load_library
from idefics3.kernels.derived import DerivedWeights
from kernels.test_cpu_decode import (
    SHAPES,
    check_out_of_range_inputs,
    check_shared_prompt,
    side_by_side,
    tiny_model,
)

if not {"avx2", "fma", "f16c"} <= cpu_flags():
    pytest.skip("the CPU lacks AVX2, FMA or F16C", allow_module_level=True)


DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 0.03}  # of the largest logit / cache value


@pytest.fixture
def library(monkeypatch):
    """The avx2 build, with this machine limited to AVX2 for the test."""
    monkeypatch.setenv("IDEFICS3_CPU_ISA", "avx2")
    device.cpu_has_bf16.cache_clear()
    lib = load_library("avx2")
    if isinstance(lib, str):  # the CPU has what it needs: a failed build is a failure, not a skip
        pytest.fail(f"the avx2 decode kernel did not build: {lib}", pytrace=False)
    yield lib
    monkeypatch.delenv("IDEFICS3_CPU_ISA")
    device.cpu_has_bf16.cache_clear()


def avx2_decoder(model, cache, lib) -> CpuDecoder:
    parts = DecoderParts.of(model)
    assert cpu_decode.unsupported_reason(parts, cache) is None
    assert cpu_decode.variant_for(parts.dtype) == "avx2"
    return CpuDecoder(parts, cache, lib, DerivedWeights(), "avx2")


def compare(lib, shape: str, dtype: torch.dtype, lengths: list[int], slots: list[int] | None, max_batch: int,
            steps: int = 4, **text) -> None:
    side_by_side(tiny_model(shape, dtype, **text), lambda model, cache: avx2_decoder(model, cache, lib), lengths,
                 slots, max_batch, steps, TOL[dtype], TOL[dtype])


def test_avx2_machine_gets_this_variant(library):
    assert cpu_decode.variant_for(torch.float32) == cpu_decode.variant_for(torch.bfloat16) == "avx2"
    assert not device.cpu_has_bf16()


def test_library_has_no_avx512(library):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump to disassemble the library")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", library._name], capture_output=True, text=True,
                          check=True).stdout
    assert "vfmadd" in text and "ymm" in text  # the disassembly is the kernel's
    assert "zmm" not in text and not re.search(r"%k[0-7]\b", text)  # no 512-bit register, no mask register


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batch_in_unordered_slots(library, shape, dtype):
    compare(library, shape, dtype, lengths=[5, 11, 2], slots=[2, 0, 3], max_batch=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_one_without_slots(library, dtype):
    compare(library, "gqa-hd16", dtype, lengths=[7], slots=None, max_batch=1, steps=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_more_rows_than_one_pass(library, dtype):
    """Nine rows: the kernel serves batch rows 4 at a time from one weight load (passes of 4, 4, 1)."""
    compare(library, "gqa-hd16", dtype, lengths=[3, 1, 4, 1, 5, 9, 2, 6, 5], slots=[8, 1, 0, 7, 2, 6, 3, 5, 4],
            max_batch=9, steps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sizes_off_the_vector_width(library, dtype):
    """Hidden and MLP sizes with whole blocks of 16, a block of 8 and single elements left over (76 = 4 x 16 + 8
    + 4, 61 = 3 x 16 + 8 + 5), so every tail of the matrix products and of SiLU * up runs."""
    compare(library, "gqa-hd16", dtype, lengths=[6, 3], slots=[1, 0], max_batch=2, steps=2, hidden_size=76,
            head_dim=16, intermediate_size=61)


@pytest.mark.parametrize("head_dim", [d for d in SUPPORTED_HEAD_DIMS if d not in (16, 32, 64)])
def test_large_head_sizes(library, head_dim):
    """Head sizes above 64 take the output of P.V in several register blocks (96: 64 + 32)."""
    compare(library, "gqa-hd16", torch.float32, lengths=[9, 4], slots=[1, 0], max_batch=2, steps=2,
            head_dim=head_dim)


@pytest.mark.parametrize("shape,dtype", [("gqa-hd16", torch.float32), ("gqa3-hd32-llama3", torch.bfloat16)])
def test_shared_prompt_is_read_from_its_slot(library, shape, dtype):
    model = tiny_model(shape, dtype)
    check_shared_prompt(model, lambda cache: avx2_decoder(model, cache, library), rows=5, tol=TOL[dtype])


def test_out_of_range_inputs_raise(library):
    model = tiny_model("gqa-hd16", torch.float32)
    check_out_of_range_inputs(avx2_decoder(model, model.make_cache(2, 16), library))
