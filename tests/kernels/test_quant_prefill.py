"""Prefill on quantised weights (kernels/quant_prefill.py): the C dequantiser gives exactly quant/format.py's
matrices, the backend's FastQuantLinear views compute what QuantLinear computes (text prefill, and the vision
encoder's fused layers over a quantised tower), training and other dtypes keep the plain path, and the decode
kernel still reads the views as quantised matrices."""

from __future__ import annotations

import copy

import pytest
import torch

from idefics3.device import cpu_flags
from idefics3.kernels import cpu_decode, quant_prefill
from idefics3.kernels.backend import install_backend
from idefics3.kernels.cpu_vision import FusedVisionEncoderLayer
from idefics3.kernels.quant_prefill import FastQuantLinear, dense_weight
from idefics3.model.replace import view_as
from idefics3.quant import QuantLinear, QuantSpec
from idefics3.quant.apply import plan, quantize_model
from kernels.conftest import load_or_fail
from kernels.test_cpu_decode import tiny_model
from kernels.test_cpu_vision import frames
from kernels.test_cpu_vision import tiny_model as vision_model

SPECS = [QuantSpec(8, 32), QuantSpec(8, 64), QuantSpec(8, 0), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128),
         QuantSpec(4, 32, True), QuantSpec(4, 64, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("k", [64, 100, 56])
def test_dense_weight_equals_dequantized(library, spec, k):
    """Every format, inputs the groups divide and not (padded columns), fp32 and bf16: the same bits."""
    linear = torch.nn.Linear(k, 37, bias=False)
    module = QuantLinear.from_linear(linear, spec)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dense_weight(module, dtype), module.dequantized(dtype)), dtype


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_the_avx2_build_dequantises_to_the_same_bits(spec):
    """The AVX2 build's vectorised rows (laptops' dense prefill path): every format, K past whole runs of 32,
    fp32 and bf16 outputs, exactly quant/format.py's matrices."""
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("the CPU lacks AVX2, FMA or F16C")
    lib = load_or_fail("cpu_decode", lambda: cpu_decode.load_library("avx2"))
    for k in (64, 100, 56, 200):
        module = QuantLinear.from_linear(torch.nn.Linear(k, 37, bias=False), spec)
        for dtype, code in ((torch.float32, 0), (torch.bfloat16, 1)):
            out = torch.empty(37, k, dtype=dtype)
            lib.idefics3_dequantize(cpu_decode.weight_table(module).data_ptr(), 37, k, out.data_ptr(), code, 2)
            assert torch.equal(out, module.dequantized(dtype)), (k, dtype)


def test_non_contiguous_codes_fall_back_to_torch(library):
    module = QuantLinear.from_linear(torch.nn.Linear(64, 16, bias=False), QuantSpec(4, 32))
    module.scales = module.scales.t().contiguous().t()
    assert torch.equal(dense_weight(module, torch.float32), module.dequantized(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_installs_views_with_the_same_results(library, dtype):
    """The backend makes every QuantLinear a FastQuantLinear view (same buffers and keys), the prefill logits
    equal the plain path's (fp32 to rounding: same matrices, same multiply), and the decode kernel still takes the
    model (the views are quantised matrices to it)."""
    plain = tiny_model("gqa-hd16", dtype, intermediate_size=96)
    quantize_model(plain, plan(plain, 4, 32))
    fast = copy.deepcopy(plain)
    backend = install_backend(fast)
    assert "dequantised in C" in backend.choices["quantised prefill"].impl
    views = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert views and all(type(m) is FastQuantLinear for m in views)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = plain(ids).logits.float(), fast(ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (a - b).abs().max() <= tol * a.abs().max()
    assert cpu_decode.unsupported_reason(cpu_decode.DecoderParts.of(fast)) is None
    backend.replacements.undo()
    assert not any(type(m) is FastQuantLinear for m in fast.modules())


def test_training_takes_the_plain_path(library, monkeypatch):
    """With autograd recording the view runs QuantLinear's own forward (gradients reach x); without, the C path."""
    module = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec(4, 32))
    fast = view_as(copy.deepcopy(module), FastQuantLinear)
    calls = []
    monkeypatch.setattr(quant_prefill, "dense_weight", lambda *a: calls.append(a) or dense_weight(*a))
    x = torch.randn(100, 64, requires_grad=True)  # the "dense" method's rows
    fast(x).sum().backward()
    assert not calls and x.grad is not None
    with torch.no_grad():
        assert torch.allclose(fast(x), module(x), atol=1e-6)
    assert calls


def test_few_rows_multiply_the_codes(library, monkeypatch):
    """A few rows (a prompt's last-token head) take the decode step's products on fp32 inputs ("streamed"): the
    plain result, whatever decode's inputs are."""
    module = QuantLinear.from_linear(torch.nn.Linear(96, 40), QuantSpec(4, 32))
    fast = view_as(copy.deepcopy(module), FastQuantLinear)
    calls = []
    monkeypatch.setattr(quant_prefill, "dense_weight", lambda *a: calls.append(a) or dense_weight(*a))
    x = torch.randn(2, 3, 96)  # 6 rows
    with torch.inference_mode():
        got = fast(x)
        ref = module(x)
    assert not calls and got.shape == (2, 3, 40)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_quantised_vision_tower_takes_the_fused_layers(library, monkeypatch):
    """--include-vision: the fused encoder layers run over QuantLinears (dequantised per call) and give the
    plain path's features (fp32, to rounding; the connector's few rows with fp32 inputs)."""
    monkeypatch.setenv(cpu_decode.ENV_QUANT_INPUTS, "fp32")
    plain = vision_model(torch.float32)
    quantize_model(plain, plan(plain, 8, 32, include_vision=True))
    assert any(isinstance(m, QuantLinear) for m in plain.model.vision_model.modules())
    fast = copy.deepcopy(plain)
    install_backend(fast)
    layer = fast.model.vision_model.encoder.layers[0]
    if not (isinstance(layer, FusedVisionEncoderLayer) and layer.kernels.layers):
        pytest.skip("the fused vision layers measured slower here (calibration)")
    ran = []
    fused = FusedVisionEncoderLayer._fused
    FusedVisionEncoderLayer._fused = lambda self, *a: ran.append(1) or fused(self, *a)
    try:
        pixels = frames(plain)
        with torch.inference_mode():
            a, b = plain.get_image_features(pixels), fast.get_image_features(pixels)
    finally:
        FusedVisionEncoderLayer._fused = fused
    assert ran and (a - b).abs().max() <= 1e-5 * a.abs().max()


def tiles_or_skip():
    if quant_prefill._tile_library() is None:
        pytest.skip("no AMX tiles on this machine (or no AVX-512 build)")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("n", [48, 37, 100])
def test_tiles_equal_the_dense_multiply(library, spec, n):
    """AMX tiles over blocks dequantised in cache: the dense path's bf16 weights, exact products, fp32 sums, so the
    result is the dense product rounded once to bf16 (rows past whole blocks of 16 and 32, batch tails)."""
    tiles_or_skip()
    module = QuantLinear.from_linear(torch.nn.Linear(128, n, bias=False), spec)
    for rows in (1, 5, 17, 40):
        x = torch.randn(rows, 128).bfloat16()
        ref = torch.nn.functional.linear(x.float(), module.dequantized(torch.bfloat16).float())
        got = quant_prefill.run("tiles", module, x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert ((got.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-4).all(), (rows, spec.name)


def test_every_method_computes_the_same(library):
    """The plan only changes speed: each method (where it cannot run, the dense one) gives the dense result."""
    module = QuantLinear.from_linear(torch.nn.Linear(96, 40), QuantSpec(4, 32))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(7, 96).to(dtype)
        ref = torch.nn.functional.linear(x.float(), module.dequantized(dtype).float())
        for method in ("streamed", "tiles", "aten", "dense"):
            got = quant_prefill.run(method, module, x)
            assert got.dtype == dtype and (got.float() - ref).abs().max() <= tol * ref.abs().max(), (method, dtype)
    assert "tiles" not in quant_prefill.methods(module, torch.float32)  # bf16 inputs only


@pytest.mark.parametrize("k", [32, 96, 576, 200, 33])
def test_aten_int8_product_takes_per_channel_int8_where_it_is_right(k):
    """aten's `_weight_int8pack_mm` reads int8 per output channel as stored, equal to the dense product to the
    output's rounding; in bf16 only where K is a multiple of 32 (torch 2.13's bf16 kernel returns garbage for
    K = 200: a K it is refused for falls back to the dense path, still right). Other formats never take it."""
    module = QuantLinear.from_linear(torch.nn.Linear(k, 48, bias=False), QuantSpec(8, 0))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = torch.randn(5, k).to(dtype)
        ref = torch.nn.functional.linear(x.float(), module.dequantized(torch.float32))
        got = quant_prefill.run("aten", module, x)
        assert got.dtype == dtype and (got.float() - ref).abs().max() <= tol * ref.abs().max(), (k, dtype)
        taken = "aten" in quant_prefill.methods(module, dtype)
        assert taken == (dtype == torch.float32 or k % 32 == 0)
    for spec in (QuantSpec(8, 32), QuantSpec(4, 32)):
        assert "aten" not in quant_prefill.methods(QuantLinear.from_linear(torch.nn.Linear(64, 16), spec),
                                                   torch.float32)


def test_a_plan_takes_the_nearest_measured_row_count():
    plan = quant_prefill.PrefillPlan(("streamed", "streamed", "tiles", "tiles", "dense", "dense"), "")
    assert [plan.method(r) for r in (1, 2, 5, 9, 30, 100, 881, 5000)] == [
        "streamed", "streamed", "streamed", "tiles", "tiles", "tiles", "dense", "dense"]


def test_plans_are_measured_on_the_first_rows(library, monkeypatch, tmp_path):
    """With calibration on, each row bucket times the methods that can run on the matrix's first
    CALIBRATION_ROWS rows (views, the same outputs) and keeps the fastest, stating every timing."""
    monkeypatch.setenv("IDEFICS3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("IDEFICS3_CALIBRATE", raising=False)
    monkeypatch.setattr(quant_prefill, "CALIBRATION_ROWS", 64)
    monkeypatch.setattr(quant_prefill, "ROW_BUCKETS", (1, 16))
    module = QuantLinear.from_linear(torch.nn.Linear(64, 100, bias=False), QuantSpec(8, 32))
    part = quant_prefill._first_rows(module, 64)
    x = torch.randn(3, 64)
    assert torch.equal(part(x), module(x)[:, :64])
    plan = quant_prefill.plan_for(module, torch.bfloat16)
    can = quant_prefill.methods(module, torch.bfloat16)
    assert len(plan.methods) == 2 and set(plan.methods) <= set(can)
    if len(can) > 1:
        assert "first 64 rows" in plan.reason and "1 rows" in plan.reason and "fastest" in plan.reason


def test_the_weight_table_follows_new_tensors(library):
    module = QuantLinear.from_linear(torch.nn.Linear(64, 16, bias=False), QuantSpec(4, 32))
    assert torch.equal(dense_weight(module, torch.float32), module.dequantized(torch.float32))
    module.scales = module.scales * 2  # new tensors at other addresses: the cached table is remade
    assert torch.equal(dense_weight(module, torch.float32), module.dequantized(torch.float32))


def test_a_wrong_aten_product_is_left_out_of_the_plan(library, monkeypatch, tmp_path):
    """aten's int8 product is checked against the dense one before it is timed: where it disagrees (as torch
    2.13's bf16 kernel does for some K), no row count takes it, and the plan says why."""
    monkeypatch.setenv("IDEFICS3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("IDEFICS3_CALIBRATE", raising=False)
    monkeypatch.setattr(quant_prefill, "ROW_BUCKETS", (1, 16))
    module = QuantLinear.from_linear(torch.nn.Linear(64, 48, bias=False), QuantSpec(8, 0))
    assert quant_prefill._aten_agrees(module, torch.float32)
    wrong = lambda x, w, s: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)  # noqa: E731
    monkeypatch.setattr(torch, "_weight_int8pack_mm", wrong)
    assert not quant_prefill._aten_agrees(module, torch.float32)
    plan = quant_prefill.plan_for(module, torch.float32)
    assert "aten" not in plan.methods and "aten's int8 product left out" in plan.reason
