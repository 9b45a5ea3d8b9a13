"""Batched decode on AMX tiles (cpu_decode_amx.h) against the plain path, and how the backend chooses it.

AMX runs bf16 products of the model's own row-major weights, so it is forced here (`use_amx(1)`: every step,
one row included) and compared with the plain cached forward like the AVX-512 kernel (test_cpu_decode.py):
three shapes, rows that fill one and two blocks of 16, output sizes that are not multiples of 32 (the last
rows go through the AVX-512 dot products), a shared prompt. Skipped where the CPU (or a forced ISA level) has
no AMX.
"""

from __future__ import annotations

import pytest
import torch

from idefics3.device import cpu_isa
from idefics3.kernels import calibrate, cpu_decode
from idefics3.kernels.backend import install_backend
from kernels.test_cpu_decode import SHAPES, check_shared_prompt, compare, cpu_decoder_for, prefill, tiny_model

MLP = {"intermediate_size": 96}  # AMX takes hidden, q and MLP widths that are multiples of 32


@pytest.fixture
def amx(library):
    if cpu_isa() != "amx":
        pytest.skip(f"the ISA level is {cpu_isa()}, not amx")
    reason = cpu_decode.amx_reason(library, "avx512")
    if reason is not None:
        pytest.fail(f"a CPU with AMX, and the kernel cannot use it: {reason}", pytrace=False)


def on_amx(decoder):
    decoder.use_amx(1)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_amx_matches_plain_path(amx, shape):
    decoder = compare(shape, torch.bfloat16, lengths=[5, 11, 2], slots=[2, 0, 3], max_batch=4, setup=on_amx, **MLP)
    assert decoder.amx_rows == 1 and decoder._packed is None  # AMX reads the model's own weights


def test_amx_one_row_and_two_blocks_of_rows(amx):
    compare("gqa-hd16", torch.bfloat16, lengths=[7], slots=None, max_batch=1, steps=3, setup=on_amx, **MLP)
    lengths = [(3 * i) % 11 + 1 for i in range(17)]  # 17 rows: a block of 16 and one of a single row
    slots = [(5 * i) % 17 for i in range(17)]
    compare("gqa3-hd32-llama3", torch.bfloat16, lengths=lengths, slots=slots, max_batch=17, steps=2, setup=on_amx,
            **MLP)


def test_amx_with_a_shared_prompt(amx):
    model = tiny_model("gqa3-hd32-llama3", torch.bfloat16, **MLP)
    rows, p = 6, 9
    with torch.inference_mode():
        cache, _, _ = prefill(model, [p], [2], max_batch=rows)
        for slot in range(rows):
            cache.copy(2, slot, p)
        ids, pos = torch.arange(10, 10 + rows)[:, None], torch.full((rows, 1), p)
        plain = model(ids, position_ids=pos, kv_cache=cache, logits_to_keep=1, kv_len=p + 1).logits.float()
        decoder = cpu_decoder_for(model, cache)
        decoder.use_amx(2)
        got = decoder(ids, pos, None, p + 1, shared=torch.tensor([[2, p]] * rows)).float()
    assert (got - plain).abs().max() <= 0.03 * plain.abs().max()


def test_widths_amx_cannot_take_run_the_avx512_path(amx):
    """An MLP width that is not a multiple of 32: the step keeps AVX-512 (packed copies for batches)."""
    decoder = compare("gqa-hd16", torch.bfloat16, lengths=[3, 5], slots=None, max_batch=2, steps=2, setup=on_amx,
                      intermediate_size=56)
    assert decoder._packed is None  # use_amx(1) asked for AMX, so no copies were made: the row-major path ran


def test_forced_isa_below_amx_turns_it_off(monkeypatch, library):
    monkeypatch.setenv("IDEFICS3_CPU_ISA", "avx512_bf16")
    assert "not amx" in cpu_decode.amx_reason(library, "avx512")
    model = tiny_model("gqa-hd16", torch.bfloat16, **MLP)
    backend = install_backend(model)
    assert backend.decode_amx_rows == 0 and "AMX" not in backend.choices["decode"].impl
    decoder = backend.decoder_for(model, model.make_cache(2, 8))
    with pytest.raises(ValueError, match="AMX"):
        decoder.use_amx(1)


def test_the_backend_measures_amx_against_avx512(amx, monkeypatch, tmp_path):
    monkeypatch.setenv("IDEFICS3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("IDEFICS3_CALIBRATE", raising=False)
    monkeypatch.setattr(calibrate, "_REMEMBERED", {})
    model = tiny_model("gqa-hd16", torch.bfloat16, **MLP)
    backend = install_backend(model)
    reason = backend.choices["decode"].reason
    assert "AMX tiles measured on a decode step of 8 rows" in reason and "AVX-512" in reason
    on = backend.decode_amx_rows > 0
    assert ("ours faster" in reason.split("AMX tiles", 1)[1].split(";")[0]) == on
    decoder = backend.decoder_for(model, model.make_cache(2, 8))
    assert decoder.amx_rows == backend.decode_amx_rows
    if on:  # the packed copies made to measure AVX-512 are freed: AMX needs none
        assert backend.nbytes() < sum(p.numel() for p in model.model.text_model.parameters())


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (6, 2, 64), (8, 2, 128)])
def test_amx_attention_scores(amx, heads, kv_heads, head_dim):
    """Grouped heads of size 64 and 128 take their scores on AMX tiles, 16 positions a block: prompts longer
    than one and two blocks (the rest through vdpbf16ps), a shared prompt included (test above)."""
    compare("gqa-hd16", torch.bfloat16, lengths=[40, 17, 23], slots=[1, 2, 0], max_batch=3, steps=3, setup=on_amx,
            hidden_size=128, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, **MLP)
    model = tiny_model("gqa-hd16", torch.bfloat16, hidden_size=128, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, **MLP)
    check_shared_prompt(model, lambda cache: on_amx_decoder(model, cache), rows=4, tol=0.03, prompt=37)


def on_amx_decoder(model, cache):
    decoder = cpu_decoder_for(model, cache)
    decoder.use_amx(1)
    return decoder
