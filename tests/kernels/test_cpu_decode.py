"""The fused CPU decode kernel against the plain cached forward: logits, cache writes, greedy tokens, fallbacks.

Tiny random models of our own classes (no checkpoint files); sequences of different lengths sit in
non-ordered slots of one cache, prefilled by the plain model, then decoded by both paths from copies
of that cache. fp32 must agree to ~1e-5 and give the same greedy tokens; bf16 within 3% of the logit
scale (teacher-forced, as bf16 rounding may flip near-ties). Skipped where the kernel cannot build or
the CPU lacks the instructions.
"""

from __future__ import annotations

import copy

import pytest
import torch

from checkpoints import tiny_config
from idefics3 import Engine, Idefics3Config, Idefics3ForConditionalGeneration, SamplingParams
from idefics3.device import isa_flags
from idefics3.generation.engine import Request
from idefics3.kernels import cpu_decode
from idefics3.kernels.backend import install_backend
from idefics3.kernels.cpu_decode import CpuDecoder, DecoderParts
from inputs import engine_tokens

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= isa_flags()
BF16 = AVX512 and "avx512_bf16" in isa_flags()
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

# name: (text overrides, tie_word_embeddings)
SHAPES = {
    "gqa-hd16": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2), False),
    "mha-hd64-tied": (dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2), True),
    "gqa3-hd32-llama3": (dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                              rope_parameters=LLAMA3), False),
}


def kernel_backend(model):
    """The backend with the fused decode kernel on AVX-512 whatever a calibration would measure (these tests
    check what it computes; test_calibrate.py and test_cpu_decode_amx.py check how it is chosen)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDEFICS3_CALIBRATE", "0")
        backend = install_backend(model)
    backend.decode_amx_rows = 0  # AMX is tested in test_cpu_decode_amx.py
    return backend


def cpu_decoder_for(model, cache):
    """The fused decoder that the model's backend (installed once per model, as at load) gives an engine."""
    if getattr(model, "backend", None) is None:
        model.backend = kernel_backend(model)
    return model.backend.decoder_for(model, cache)


def tiny_model(shape: str, dtype: torch.dtype, seed: int = 0, **text) -> Idefics3ForConditionalGeneration:
    overrides, tied = SHAPES[shape]
    raw = tiny_config(text={"vocab_size": 1001, "intermediate_size": 56, **overrides, **text},
                      tie_word_embeddings=tied, model_type="idefics3")
    if "rope_parameters" in raw["text_config"]:
        raw["text_config"].pop("rope_theta")
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(raw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    return model.to(dtype).eval()


def prefill(model, lengths: list[int], slots: list[int], max_batch: int, seed: int = 1):
    """Prompts of the given lengths prefilled one by one into the given slots; returns cache, last ids, positions."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.make_cache(max_batch, 64)
    last = []
    for n, slot in zip(lengths, slots):
        ids = torch.randint(3, 1000, (1, n), generator=gen)
        out = model(ids, position_ids=torch.arange(n)[None], kv_cache=cache, cache_slots=torch.tensor([slot]),
                    logits_to_keep=1, kv_len=n)
        last.append(int(out.logits[0, -1].argmax()))
    return cache, torch.tensor(last)[:, None], torch.tensor(lengths)[:, None]


def plain_step(model, cache, ids, pos, slots):
    kv_len = int(pos.max()) + 1
    return model(ids, position_ids=pos, kv_cache=cache, cache_slots=slots, logits_to_keep=1, kv_len=kv_len).logits


def side_by_side(model, make_decoder, lengths: list[int], slots: list[int] | None, max_batch: int, steps: int,
                 logit_tol: float, cache_tol: float, greedy: bool | None = None):
    """Prefill, then decode `steps` tokens with make_decoder(model, cache copy) and with the plain path side by
    side: logits within logit_tol of the largest, the same greedy tokens where `greedy` (default: in fp32; else
    teacher-forced with the plain path's), the rows' keys and values within cache_tol. Returns the decoder."""
    fp32 = model.model.text_model.norm.weight.dtype == torch.float32 if greedy is None else greedy
    with torch.inference_mode():
        cache, ids, pos = prefill(model, lengths, slots or list(range(len(lengths))), max_batch)
        fast_cache = copy.deepcopy(cache)
        decoder = make_decoder(model, fast_cache)
        slot_t = None if slots is None else torch.tensor(slots)
        fast_ids = ids
        for _ in range(steps):
            ref = plain_step(model, cache, ids, pos, slot_t).float()  # [R, 1, V]
            got = decoder(fast_ids, pos, slot_t, int(pos.max()) + 1).float()
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert (got - ref).abs().max() <= logit_tol * ref.abs().max()
            if fp32:
                assert torch.equal(got.argmax(-1), ref.argmax(-1))
            ids = ref.argmax(-1)  # [R, 1]
            fast_ids = got.argmax(-1) if fp32 else ids
            pos = pos + 1
        rows = torch.arange(len(lengths)) if slots is None else torch.tensor(slots)
        for k, fk in zip(cache.k + cache.v, fast_cache.k + fast_cache.v):
            written, fast = k[rows].float(), fk[rows].float()  # the rows in use, every position
            assert (written - fast).abs().max() <= cache_tol * written.abs().max()
    return decoder


def compare(shape: str, dtype: torch.dtype, lengths: list[int], slots: list[int] | None, max_batch: int,
            steps: int = 4, setup=None, **text) -> CpuDecoder:
    """Decode with the kernel (after `setup(decoder)`, e.g. forcing AMX) and the plain path side by side."""
    def make(model, cache):
        decoder = cpu_decoder_for(model, cache)
        assert isinstance(decoder, CpuDecoder)
        if setup is not None:
            setup(decoder)
        return decoder

    fp32 = dtype == torch.float32
    return side_by_side(tiny_model(shape, dtype, **text), make, lengths, slots, max_batch, steps,
                        logit_tol=2e-5 if fp32 else 0.03, cache_tol=1e-5 if fp32 else 0.03)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_matches_plain_path(library, shape):
    compare(shape, torch.float32, lengths=[5, 11, 2], slots=[2, 0, 3], max_batch=4)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bf16_matches_plain_path(library, shape):
    if not BF16:
        pytest.skip("the CPU lacks AVX512-BF16")
    compare(shape, torch.bfloat16, lengths=[5, 11, 2], slots=[2, 0, 3], max_batch=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_one_without_slots(library, dtype):
    if dtype == torch.bfloat16 and not BF16:
        pytest.skip("the CPU lacks AVX512-BF16")
    compare("gqa-hd16", dtype, lengths=[7], slots=None, max_batch=1, steps=6)


def test_more_rows_than_one_pass(library):
    """Nine rows: the kernel serves batch rows 8 at a time from one weight load."""
    compare("gqa-hd16", torch.float32, lengths=[3, 1, 4, 1, 5, 9, 2, 6, 5], slots=[8, 1, 0, 7, 2, 6, 3, 5, 4],
            max_batch=9, steps=2)


@pytest.mark.parametrize("shape", ["gqa-hd16", "gqa3-hd32-llama3"])
def test_bf16_batches_run_on_packed_weights(library, shape):
    """bf16 batches decode on packed copies of the weights (made at the first batch, not for batch 1): nine rows
    (two passes of the row block), vocab and MLP sizes that are not multiples of 16 (padded blocks); with
    head size 32 the grouped attention takes its scores with vdpbf16ps."""
    if not BF16:
        pytest.skip("the CPU lacks AVX512-BF16")
    compare(shape, torch.bfloat16, lengths=[3, 1, 4, 1, 5, 9, 2, 6, 5], slots=[8, 1, 0, 7, 2, 6, 3, 5, 4],
            max_batch=9, steps=2)
    model = tiny_model("gqa-hd16", torch.bfloat16)
    with torch.inference_mode():
        cache, ids, pos = prefill(model, [4, 6], [0, 1], max_batch=2)
        decoder = cpu_decoder_for(model, cache)
        decoder(ids[:1], pos[:1], torch.tensor([0]), int(pos[0]) + 1)
        assert decoder._packed is None  # batch 1 streams the model's own tensors
        decoder(ids, pos, None, int(pos.max()) + 1)
        assert decoder._packed is not None
        again = cpu_decoder_for(model, cache)  # a later decoder (the next generate call) reuses the copies
        again(ids, pos, None, int(pos.max()) + 1)
        assert all(a is b for a, b in zip(again._packed, decoder._packed))
        model.lm_head.weight.mul_(2)  # changed in place: packed again
        third = cpu_decoder_for(model, cache)
        third(ids, pos, None, int(pos.max()) + 1)
        assert third._packed[-1] is not decoder._packed[-1]
        assert torch.equal(third._packed[-1], cpu_decode.pack_for_batches(model.lm_head.weight))


@pytest.mark.parametrize("n,k", [(1, 2), (16, 8), (37, 6), (64, 4)])
def test_packed_layout(n, k):
    w = torch.randn(n, k).to(torch.bfloat16)
    packed = cpu_decode.pack_for_batches(w)  # [N/32, K/2, 32, 2]
    assert packed.shape == (-(-n // 32), k // 2, 32, 2)
    for col, kk in [(0, 0), (n - 1, k - 1), (n // 2, k // 2)]:
        assert packed[col // 32, kk // 2, col % 32, kk % 2] == w[col, kk]
    assert packed.flatten().count_nonzero() == w.count_nonzero()  # the padding is zeros
    gate, up = torch.randn(20, 4), torch.randn(20, 4)
    both = cpu_decode.interleave_blocks(gate, up)  # blocks of 16 rows: gate, up, gate, up
    assert both.shape == (64, 4)
    assert torch.equal(both[:16], gate[:16]) and torch.equal(both[16:32], up[:16])
    assert torch.equal(both[32:36], gate[16:]) and torch.equal(both[48:52], up[16:])
    assert not both[36:48].any() and not both[52:].any()


def check_shared_prompt(model, make_decoder, rows: int, tol: float, prompt: int = 9) -> None:
    """Rows decoding from one prompt (copied into each row's slot) read its keys from the slot named in
    `shared`: with the other copies overwritten, the logits are those of the intact cache; without `shared`
    the same overwrite changes them (so the first check can fail). make_decoder(cache) -> a decoder of model."""
    p = prompt
    with torch.inference_mode():
        cache, _, _ = prefill(model, [p], [3], max_batch=rows)
        for slot in range(rows):
            cache.copy(3, slot, p)
        ids = torch.arange(10, 10 + rows)[:, None]  # a different next token in every row
        pos = torch.full((rows, 1), p)
        shared = torch.tensor([[3, p]] * rows)
        intact, broken = copy.deepcopy(cache), cache
        for buf in broken.k + broken.v:
            buf[[r for r in range(rows) if r != 3], :, :p] = torch.randn_like(buf[0, :, :p])
        ref_dec, dec = make_decoder(intact), make_decoder(broken)
        for step in range(3):  # later steps read the rows' own new keys after the shared ones
            ref = ref_dec(ids, pos, None, p + step + 1).float()
            got = dec(ids, pos, None, p + step + 1, shared=shared).float()
            assert (got - ref).abs().max() <= tol * ref.abs().max()
            if step == 0:
                unshared = make_decoder(copy.deepcopy(broken))(ids, pos, None, p + 1).float()
                assert (unshared - ref).abs().max() > 0.1 * ref.abs().max()
            ids, pos = ref.argmax(-1), pos + 1


@pytest.mark.parametrize("shape,dtype", [("gqa-hd16", torch.float32), ("gqa3-hd32-llama3", torch.bfloat16)])
def test_shared_prompt_is_read_from_its_slot(library, shape, dtype):
    if dtype == torch.bfloat16 and not BF16:
        pytest.skip("the CPU lacks AVX512-BF16")
    model = tiny_model(shape, dtype)
    check_shared_prompt(model, lambda cache: cpu_decoder_for(model, cache), rows=8,
                        tol=1e-5 if dtype == torch.float32 else 0.03)


def check_out_of_range_inputs(decoder) -> None:
    """A decoder over a cache of 2 rows x 16 positions and a vocabulary under 5000 refuses each bad input by name."""
    with pytest.raises(ValueError, match="token id"):
        decoder(torch.tensor([[5000]]), torch.tensor([[0]]), None, 1)
    with pytest.raises(ValueError, match="slot"):
        decoder(torch.tensor([[5]]), torch.tensor([[0]]), torch.tensor([7]), 1)
    with pytest.raises(ValueError, match="KV cache"):
        decoder(torch.tensor([[5]]), torch.tensor([[16]]), None, 17)
    for shared in ([[5, 2]], [[1, 5]]):  # a slot outside the cache; longer than the row's own positions
        with pytest.raises(ValueError, match="shared prefix"):
            decoder(torch.tensor([[5]]), torch.tensor([[3]]), None, 4, shared=torch.tensor(shared))
    with pytest.raises(ValueError, match="shared must be"):
        decoder(torch.tensor([[5]]), torch.tensor([[3]]), None, 4, shared=torch.tensor([1, 5]))


def test_out_of_range_inputs_raise(library):
    model = tiny_model("gqa-hd16", torch.float32)
    check_out_of_range_inputs(cpu_decoder_for(model, model.make_cache(2, 16)))


def test_engine_fast_and_plain_decode_agree(library):
    model = tiny_model("gqa-hd16", torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (4, 9, 6)]

    def run(fast: bool) -> list[list[int]]:
        engine = Engine(model, max_batch=2, max_seq_len=64, eos_token_ids=[0], fast_decode=fast,
                        backend=kernel_backend(model))
        assert (engine.fast_decoder is not None) == fast
        return engine_tokens(engine, prompts, max_new_tokens=7)

    assert run(True) == run(False)


# ---- the switch and the fallbacks: no build needed ----------------------------------------------------------
def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("IDEFICS3_KERNELS", "0")
    model = tiny_model("gqa-hd16", torch.float32)
    backend = install_backend(model)
    assert backend.decoder_for(model, model.make_cache(1, 8)) is None
    assert Engine(model, max_batch=1, max_seq_len=8, eos_token_ids=[0], backend=backend).fast_decoder is None
    assert "IDEFICS3_KERNELS=0" in backend.choices["decode"].reason


def test_unsupported_configurations_fall_back(monkeypatch):
    model = tiny_model("gqa-hd16", torch.float32)
    cache = model.make_cache(1, 8)
    biased = tiny_model("gqa-hd16", torch.float32, attention_bias=True)
    reason = cpu_decode.unsupported_reason
    assert "biases" in reason(DecoderParts.of(biased), biased.make_cache(1, 8))
    wrapped = copy.deepcopy(model)
    wrapped.model.text_model.layers[1].mlp.up_proj = torch.nn.Sequential(wrapped.model.text_model.layers[1].mlp.up_proj)
    assert "up_proj" in reason(DecoderParts.of(wrapped), cache)
    bf16_cache = copy.deepcopy(model).to(torch.bfloat16).make_cache(1, 8)
    assert "cache" in reason(DecoderParts.of(model), bf16_cache)
    monkeypatch.setenv("IDEFICS3_CPU_ISA", "none")  # a CPU without AVX2 (or ARM): the plain path
    assert "ISA level is none" in reason(DecoderParts.of(model), cache)
    assert install_backend(model).decoder_for(model, cache) is None


def test_failed_build_falls_back(monkeypatch):
    if not AVX512:
        pytest.skip("the CPU lacks AVX-512: the build is never tried")
    monkeypatch.setattr(cpu_decode, "load_library", lambda variant="avx512": "the kernel did not build (no g++)")
    model = tiny_model("gqa-hd16", torch.float32)
    backend = install_backend(model)
    engine = Engine(model, max_batch=1, max_seq_len=16, eos_token_ids=[0], backend=backend)
    assert engine.fast_decoder is None and "no g++" in backend.choices["decode"].reason
    engine.add(Request([5, 6, 7], SamplingParams(max_new_tokens=3)))
    while engine.has_work():
        engine.step()
