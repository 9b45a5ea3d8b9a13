"""The fused CPU decode step on quantised weights (cpu_decode_quant.h, cpu_decode_quant_avx2.h) against the plain path.

Tiny random models (test_cpu_decode.py's shapes) quantised by the package's policy (quant/apply.py `plan`): every
format the kernel streams (int8 in groups of 32 and 64 and per output channel, int4 in groups of 32, 64 and 128,
int4 with minimums, an int4 or int8 head, tied and untied heads, inputs the groups do not divide, which
quant/format.py stores padded with zero columns, dense projections beside quantised ones), on each build this CPU
runs (the AVX-512 one, and the AVX2 one with the machine made to stop at AVX2). The plain path dequantises each
matrix and runs F.linear (QuantLinear.forward), so fp32 logits must agree to float rounding and give the same
greedy tokens, bf16 within the model's tolerance (teacher-forced). Also: a batch equals its rows decoded one by
one, the shared-prompt mechanism, out-of-range inputs, what is refused (biases, other embedding dtypes, other
shapes, strided tensors), that a quantised model never gets packed copies or AMX tiles, and how the backend names
and keys its formats.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from idefics3 import Engine
from idefics3.device import cpu_flags, isa_flags
from idefics3.kernels import calibrate, cpu_decode
from idefics3.kernels.backend import install_backend
from idefics3.kernels.cpu_decode import CpuDecoder, DecoderParts
from idefics3.kernels.derived import DerivedWeights
from idefics3.quant import QuantLinear, QuantSpec
from idefics3.quant.apply import plan, quantize_model
from idefics3.quant.format import quantize_inputs
from inputs import engine_tokens
from kernels.test_cpu_decode import (
    check_out_of_range_inputs,
    check_shared_prompt,
    prefill,
    side_by_side,
    tiny_model,
)

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= isa_flags()
BF16 = AVX512 and "avx512_bf16" in isa_flags()
AVX2 = {"avx2", "fma", "f16c"} <= cpu_flags()
TOL = {torch.float32: 2e-5, torch.bfloat16: 0.03}  # of the largest logit / cache value
# With int8 inputs the plain path rounds its inputs as the kernel does (plain_inputs_as_kernel), but an input the
# two computed a last bit apart can round to the next code: one code of one run moves a tiny random model's
# logits by up to ~2% (measured); test_products_equal_dequantise_then_multiply checks the products exactly.
INT8_INPUTS_TOL = 0.05

# name: (shape, text overrides, bits, group size, head bits, int4 with minimums, projections kept dense)
FORMATS = {
    "int8-g32": ("gqa-hd16", {"intermediate_size": 96}, 8, 32, 8, False, ()),
    # MLP 56: down_proj's 56 inputs end in a part of a vector under one per-channel scale
    "int8-channel": ("gqa-hd16", {}, 8, 0, 8, False, ()),
    # down_proj's 56 inputs stored as 64 (zero columns)
    "int8-g64-padded": ("gqa-hd16", {}, 8, 64, 8, False, ()),
    # MLP 96: down_proj's last run of 32 inputs has no partner in its pair of runs
    "int4-g32": ("gqa-hd16", {"intermediate_size": 96}, 4, 32, 8, False, ()),
    "int4-g64-tied": ("mha-hd64-tied", {"intermediate_size": 128}, 4, 64, 8, False, ()),
    "int4-g128-tied": ("mha-hd64-tied", {"intermediate_size": 256}, 4, 128, 8, False, ()),
    # hidden 64 and MLP 96 stored as 128 columns
    "int4-g128-padded": ("gqa-hd16", {"intermediate_size": 96}, 4, 128, 8, False, ()),
    # with minimums the padding's codes are not zero weights: the inputs past K must count as zero
    "int4-asym-g32-padded": ("gqa-hd16", {}, 4, 32, 8, True, ()),
    "int4-g32-head4": ("gqa-hd16", {"intermediate_size": 96}, 4, 32, 4, False, ()),
    "int4-asym-g64-head4-tied": ("mha-hd64-tied", {"intermediate_size": 128}, 4, 64, 4, True, ()),
    "int4-g32-mixed": ("gqa-hd16", {"intermediate_size": 96}, 4, 32, 8, False, ("q_proj", "v_proj", "up_proj")),
}
# (build, how its quantised products take x: "int8" where it has VNNI, see cpu_decode.quant_inputs)
ISAS = [("avx512", "int8"), ("avx512", "fp32"), ("avx2", "fp32")]
VNNI = AVX512 and "avx512_vnni" in isa_flags()


def quantised_model(name: str, dtype: torch.dtype, seed: int = 0):
    shape, text, bits, group, head_bits, asymmetric, dense = FORMATS[name]
    model = tiny_model(shape, dtype, seed=seed, **text)
    config = plan(model, bits, group, head_bits=head_bits)
    config.modules = {k: QuantSpec(4, s.group_size, True) if asymmetric and s.bits == 4 and ".layers." in k else s
                      for k, s in config.modules.items() if k.rsplit(".", 1)[-1] not in dense}
    quantize_model(model, config)
    return model


@pytest.fixture(params=ISAS, ids=lambda p: f"{p[0]}-{p[1]}-inputs")
def isa(request, monkeypatch):
    """The build under test ("avx512" or "avx2", the machine made to stop at AVX2 for the latter), built, with
    its quantised products taking int8 or fp32 inputs (IDEFICS3_QUANT_INPUTS)."""
    from idefics3 import device

    build, inputs = request.param
    if build == "avx512" and not AVX512:
        pytest.skip("the CPU lacks AVX-512")
    if inputs == "int8" and not VNNI:
        pytest.skip("the CPU lacks AVX512-VNNI")
    if build == "avx2":
        if not AVX2:
            pytest.skip("the CPU lacks AVX2, FMA or F16C")
        monkeypatch.setenv("IDEFICS3_CPU_ISA", "avx2")
    monkeypatch.setenv(cpu_decode.ENV_QUANT_INPUTS, inputs)
    device.cpu_has_bf16.cache_clear()
    lib = cpu_decode.load_library(build)
    if isinstance(lib, str):
        pytest.fail(f"the {build} decode kernel did not build: {lib}", pytrace=False)
    yield build
    monkeypatch.delenv("IDEFICS3_CPU_ISA", raising=False)
    device.cpu_has_bf16.cache_clear()


@contextlib.contextmanager
def plain_inputs_as_kernel(isa: str):
    """The plain path as the kernel computes: where the build takes int8 inputs, each QuantLinear's input rounded
    as quantize_inputs does (the kernel's products are exact on those); else as it is."""
    if cpu_decode.quant_inputs(isa) != "int8":
        yield
        return
    forward = QuantLinear.forward
    QuantLinear.forward = lambda self, x: forward(self, quantize_inputs(x))
    try:
        yield
    finally:
        QuantLinear.forward = forward


def needs(isa: str, dtype: torch.dtype) -> None:
    if isa == "avx512" and dtype == torch.bfloat16 and not BF16:
        pytest.skip("the CPU lacks AVX512-BF16")


def make_decoder(model, cache, isa: str) -> CpuDecoder:
    parts = DecoderParts.of(model)
    assert cpu_decode.unsupported_reason(parts, cache) is None
    assert cpu_decode.variant_for(parts.dtype) == isa
    decoder = CpuDecoder(parts, cache, cpu_decode.load_library(isa), DerivedWeights(), isa)
    assert decoder.inputs == cpu_decode.quant_inputs(isa)
    return decoder


def compare(model, isa: str, lengths: list[int], slots: list[int] | None, max_batch: int, steps: int = 2) -> None:
    """Decode with the kernel and the plain path side by side from copies of one prefilled cache."""
    dtype = model.model.text_model.norm.weight.dtype
    int8 = cpu_decode.quant_inputs(isa) == "int8"
    tol = max(TOL[dtype], INT8_INPUTS_TOL) if int8 else TOL[dtype]
    with plain_inputs_as_kernel(isa):
        side_by_side(model, lambda m, cache: make_decoder(m, cache, isa), lengths, slots, max_batch, steps, tol, tol,
                     greedy=dtype == torch.float32 and not int8)


# (bits, group size, with minimums, N, K): every product shape and tail the blocks have
PRODUCTS = [(8, 32, False, 9, 64), (8, 32, False, 7, 96), (8, 64, False, 5, 192), (8, 128, False, 6, 640),
            (8, 0, False, 9, 56), (8, 0, False, 5, 200), (4, 32, False, 9, 96), (4, 32, False, 6, 576),
            (4, 64, False, 5, 192), (4, 128, False, 7, 384), (4, 32, True, 9, 160), (4, 64, True, 5, 320),
            (4, 128, False, 4, 100), (4, 32, True, 3, 56)]


@pytest.mark.parametrize("build,int8_inputs", [("avx512", False), ("avx512", True), ("avx2", False)],
                         ids=["avx512-fp32-inputs", "avx512-int8-inputs", "avx2-fp32-inputs"])
@pytest.mark.parametrize("bits,group,asym,n,k", PRODUCTS, ids=lambda v: str(v))
def test_products_equal_dequantise_then_multiply(bits, group, asym, n, k, build, int8_inputs):
    """One quantised product (cpu_decode.quant_linear, either build), at batch 1, 2 and 9 (the row blocks of each
    size), equals dequantise(W) x, with x rounded as quantize_inputs rounds it where the inputs are int8: the same
    inputs, so only the order of fp32 roundings differs."""
    if build == "avx512" and not AVX512:
        pytest.skip("the CPU lacks AVX-512")
    if int8_inputs and not VNNI:
        pytest.skip("the CPU lacks AVX512-VNNI")
    lib = cpu_decode.load_library(build)
    if isinstance(lib, str):
        pytest.skip(lib)
    gen = torch.Generator().manual_seed(n * k + bits)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
    module = QuantLinear.from_linear(linear, QuantSpec(bits, group, asym))
    w = module.dequantized(torch.float32)  # [N, K]
    for rows in (1, 2, 9):
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4  # [R, K]
        ref = (quantize_inputs(x) if int8_inputs else x) @ w.T
        got = cpu_decode.quant_linear(lib, module, x, int8_inputs)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (rows, (got - ref).abs().max())


def test_the_avx2_build_refuses_int8_inputs():
    lib = cpu_decode.load_library("avx2")
    if isinstance(lib, str):
        pytest.skip(lib)
    module = QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="AVX-512"):
        cpu_decode.quant_linear(lib, module, torch.randn(1, 64), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(FORMATS))
def test_matches_plain_path(isa, name, dtype):
    needs(isa, dtype)
    model = quantised_model(name, dtype)
    assert DecoderParts.of(model).quantised
    compare(model, isa, lengths=[5, 11, 2], slots=[2, 0, 3], max_batch=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_one_without_slots(isa, dtype):
    needs(isa, dtype)
    compare(quantised_model("int4-g32", dtype), isa, lengths=[7], slots=None, max_batch=1, steps=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["int8-g32", "int4-asym-g32-padded"])
def test_batch_equals_its_rows(isa, name, dtype):
    """Nine rows in one step (more than one block of batch rows per weight load in both builds) give each row's
    logits as a step of that row alone does."""
    needs(isa, dtype)
    model = quantised_model(name, dtype)
    lengths, slots = [3, 1, 4, 1, 5, 9, 2, 6, 5], [8, 1, 0, 7, 2, 6, 3, 5, 4]
    with torch.inference_mode():
        cache, ids, pos = prefill(model, lengths, slots, max_batch=9)
        slot_t = torch.tensor(slots)
        together = make_decoder(model, copy.deepcopy(cache), isa)(ids, pos, slot_t, int(pos.max()) + 1).float()
        alone = make_decoder(model, cache, isa)
        for r in range(len(lengths)):
            one = alone(ids[r:r + 1], pos[r:r + 1], slot_t[r:r + 1], int(pos[r]) + 1).float()
            scale = one.abs().max()
            tol = 1e-5 if dtype == torch.float32 else 0.01  # summation order; bf16: one rounding of a logit
            assert (together[r] - one[0]).abs().max() <= tol * scale
            if dtype == torch.float32:
                assert torch.equal(together[r].argmax(-1), one[0].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_prompt_is_read_from_its_slot(isa, dtype):
    needs(isa, dtype)
    model = quantised_model("int4-asym-g32-padded", dtype)
    check_shared_prompt(model, lambda cache: make_decoder(model, cache, isa), rows=6,
                        tol=1e-5 if dtype == torch.float32 else 0.03)


def test_decoder_input_modes(isa):
    """An explicit mode overrides the environment's; an unknown one, or int8 where the build has no VNNI path,
    is refused by name."""
    model = quantised_model("int4-g32", torch.float32)
    parts, lib = DecoderParts.of(model), cpu_decode.load_library(isa)
    assert CpuDecoder(parts, model.make_cache(1, 8), lib, DerivedWeights(), isa, "fp32").inputs == "fp32"
    if cpu_decode.has_int8_inputs(isa):  # int8 asked explicitly under IDEFICS3_QUANT_INPUTS=fp32 too
        assert CpuDecoder(parts, model.make_cache(1, 8), lib, DerivedWeights(), isa, "int8").inputs == "int8"
    with pytest.raises(ValueError, match="inputs must be one of"):
        CpuDecoder(parts, model.make_cache(1, 8), lib, DerivedWeights(), isa, "int4")
    if not cpu_decode.has_int8_inputs(isa):
        with pytest.raises(ValueError, match="VNNI"):
            CpuDecoder(parts, model.make_cache(1, 8), lib, DerivedWeights(), isa, "int8")


def test_out_of_range_inputs_raise(isa):
    model = quantised_model("int4-g32", torch.float32)
    check_out_of_range_inputs(make_decoder(model, model.make_cache(2, 16), isa))


def test_no_packed_copies_or_amx(isa):
    """Packed copies and AMX tiles are for dense bf16 weights: a quantised model streams its codes at every batch
    size, and says why it takes neither."""
    needs(isa, torch.bfloat16)
    model = quantised_model("int4-g32", torch.bfloat16)
    with torch.inference_mode():
        cache, ids, pos = prefill(model, [4, 6], [0, 1], max_batch=2)
        decoder = make_decoder(model, cache, isa)
        decoder(ids, pos, None, int(pos.max()) + 1)
        assert decoder.quantised and decoder._packed is None and not decoder._can_pack
        with pytest.raises(ValueError, match="quantised"):
            decoder.use_amx(1)
    lib = cpu_decode.load_library(isa)
    assert "quantised" in cpu_decode.amx_reason(lib, isa, quantised=True)


# ---- what the Python side accepts, names and keys: no particular build needed beyond the machine's own ----------
def test_unsupported_quantised_modules_fall_back(library):
    model = quantised_model("int4-g32", torch.float32)
    cache = model.make_cache(1, 8)
    reason = cpu_decode.unsupported_reason
    assert reason(DecoderParts.of(model), cache) is None
    biased = copy.deepcopy(model)
    layer = biased.model.text_model.layers[0].self_attn
    q = QuantLinear(layer.q_proj.in_features, layer.q_proj.out_features, layer.q_proj.spec, bias=True)
    q.set_quantised(layer.q_proj.quant_tensors())
    layer.q_proj = q
    assert "q_proj" in reason(DecoderParts.of(biased), cache)
    other_dtype = copy.deepcopy(model)
    other_dtype.model.text_model.embed_tokens.dtype = torch.bfloat16
    assert "embed_tokens" in reason(DecoderParts.of(other_dtype), cache)
    wrong = copy.deepcopy(model)  # a k_proj of another shape than the config's kv heads give
    wrong.model.text_model.layers[0].self_attn.k_proj = QuantLinear(64, 48, QuantSpec(4, 32))
    assert "k_proj is [48, 64]" in reason(DecoderParts.of(wrong), cache)
    strided = copy.deepcopy(model)
    mlp = strided.model.text_model.layers[1].mlp
    mlp.up_proj.scales = mlp.up_proj.scales.t().contiguous().t()  # same values, not contiguous
    assert "up_proj" in reason(DecoderParts.of(strided), cache)


def test_formats_name_each_part(library):
    dense = tiny_model("gqa-hd16", torch.float32)
    assert not DecoderParts.of(dense).quantised and DecoderParts.of(dense).formats() == "dense"
    parts = DecoderParts.of(quantised_model("int4-g32-head4", torch.float32))
    assert parts.formats() == "decoder int4-g32, lm_head int4-g32, embed_tokens int4-g32"
    mixed = DecoderParts.of(quantised_model("int4-g32-mixed", torch.float32))
    assert mixed.formats() == "decoder dense+int4-g32, lm_head int8-g32, embed_tokens int4-g32"


def test_backend_uses_the_kernel_and_keys_calibration_by_format(library, monkeypatch):
    """The backend takes the kernel for a quantised model (named with its formats in describe()); a calibration
    verdict measured on one format is not reused for another of the same shapes."""
    model = quantised_model("int4-g32", torch.float32)
    backend = install_backend(model)  # IDEFICS3_CALIBRATE=0 in the tests: the kernel wherever it runs
    assert "int4-g32" in backend.choices["decode"].impl
    assert isinstance(backend.decoder_for(model, model.make_cache(1, 16)), CpuDecoder)
    keys = []
    monkeypatch.setenv("IDEFICS3_CALIBRATE", "1")
    monkeypatch.setattr(calibrate, "compare", lambda parts, *a, **k: keys.append(parts) or calibrate.Verdict(True, ""))
    for name in ("int4-g32", "int8-g32"):
        calibrate.decode(quantised_model(name, torch.float32), DerivedWeights(), "avx512", amx=False)
    calibrate.decode(tiny_model("gqa-hd16", torch.float32, intermediate_size=96), DerivedWeights(), "avx512",
                     amx=False)
    assert len({key for key in keys}) == 3 and all(key[0] == "decode" for key in keys)


def test_model_quantised_after_its_backend_decodes_without_amx(library):
    """A backend chosen for dense weights (AMX for batches, say) gives a model quantised since a decoder on the
    quantised weights, without AMX."""
    model = tiny_model("gqa-hd16", torch.bfloat16 if BF16 else torch.float32, intermediate_size=96)
    backend = install_backend(model)
    backend.decode_amx_rows = 2
    quantize_model(model, plan(model, 4, 32))
    decoder = backend.decoder_for(model, model.make_cache(2, 16))
    assert isinstance(decoder, CpuDecoder) and decoder.quantised and decoder.amx_rows == 0


def test_engine_fast_and_plain_decode_agree(library, monkeypatch):
    """The engine's fused and plain decode give the same greedy tokens, on the exact (fp32-input) products: with
    int8 inputs a tiny random model's near-ties can flip (their logits are checked to a tolerance above)."""
    monkeypatch.setenv(cpu_decode.ENV_QUANT_INPUTS, "fp32")
    model = quantised_model("int4-asym-g32-padded", torch.float32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (4, 9, 6)]

    def run(fast: bool) -> list[list[int]]:
        engine = Engine(model, max_batch=2, max_seq_len=64, eos_token_ids=[0], fast_decode=fast,
                        backend=install_backend(model))
        assert (engine.fast_decoder is not None) == fast
        return engine_tokens(engine, prompts, max_new_tokens=7)

    assert run(True) == run(False)
