"""Our quantiser and quantised checkpoints: the formats, the policy, folders that round-trip, loading that
quantises while reading, and the errors a damaged or foreign quantised folder gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_hf_model, save_checkpoint, tiny_config
from idefics3 import Idefics3Config, Idefics3ForConditionalGeneration
from idefics3.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantError,
    QuantLinear,
    QuantSpec,
    dequantize,
    dequantize_model,
    parse_quantize,
    plan,
    quantize,
    quantize_model,
    quantized_nbytes,
)
from idefics3.quant.format import pack_int4, unpack_int4

SPECS = [QuantSpec(8, 0), QuantSpec(8, 32), QuantSpec(8, 128), QuantSpec(4, 32), QuantSpec(4, 64),
         QuantSpec(4, 128), QuantSpec(4, 32, asymmetric=True)]


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """A tiny checkpoint whose text matrices split into groups of 32 (the vision MLP's 48 inputs do not)."""
    folder = tmp_path_factory.mktemp("quant") / "dense"
    hf = build_hf_model(tiny_config(text=dict(intermediate_size=96), tie_word_embeddings=True), seed=5)
    save_checkpoint(hf, folder)
    return folder


def load(folder, dtype="float32", **kw):
    return Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, backend="torch", **kw)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_quantise_then_dequantise_is_within_a_step(spec):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    w[3, 40] = 0.9  # one outlier: its group's scale grows, other groups keep theirs
    stored = quantize(w, spec)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in stored.items()} == {
        k: (spec.dtypes()[k], shape) for k, shape in spec.shapes(48, 256).items()}
    back = dequantize(spec, **stored)
    step = dequantize(spec, torch.ones_like(stored["qweight"]) if spec.bits == 8 else
                      torch.full_like(stored["qweight"], 0x99), stored["scales"],
                      None if "mins" not in stored else torch.zeros_like(stored["mins"]))  # one step per entry
    # rounding costs half a step; int4's scale search may clip values near the peak (by at most 1.5 steps)
    # when that lowers the group's squared error, so it never does worse than llama.cpp's Q4_0 choice
    clipped = spec.bits == 4 and not spec.asymmetric
    assert ((back - w).abs() <= step.abs() * (1.5 if clipped else 0.5) + 1e-6).all()
    if clipped:
        g = w.reshape(48, -1, spec.group_size)  # [N, K/G, G]
        peak = g.gather(2, g.abs().argmax(2, keepdim=True))
        s0 = (peak / -8).half().float()
        q4_0 = ((g / s0).round().clamp(-8, 7) * s0).reshape(48, 256)
        assert ((back - w) ** 2).sum() <= ((q4_0 - w) ** 2).sum()
    assert sum(t.numel() * t.element_size() for t in stored.values()) == spec.nbytes(48, 256)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 128)], ids=lambda s: s.name)
def test_int4_scale_search_weighs_each_input_by_its_importance(spec):
    """With an importance per input, the chosen scales give a smaller weighted error than the unweighted
    search's, and the inputs that matter are rounded more closely; wrong importances are refused."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 256, generator=gen) * 0.05
    importance = torch.where(torch.rand(256, generator=gen) < 0.2, 50.0, 1.0)  # a few inputs dominate
    err = {}
    for name, imp in (("plain", None), ("weighted", importance)):
        back = dequantize(spec, **quantize(w, spec, importance=imp))
        err[name] = ((back - w) ** 2 * importance).sum(), ((back - w) ** 2)[:, importance > 1].sum()
    assert err["weighted"][0] < 0.95 * err["plain"][0], err
    assert err["weighted"][1] < err["plain"][1], err
    assert torch.equal(quantize(w, spec, importance=torch.full((256,), 3.0))["scales"], quantize(w, spec)["scales"])
    with pytest.raises(QuantError, match="importance"):
        quantize(w, spec, importance=torch.ones(255))
    with pytest.raises(QuantError, match="importance"):
        quantize(w, spec, importance=-importance)
    with pytest.raises(QuantError, match="importance"):
        quantize(w, spec, importance=torch.full((256,), float("inf")))


def test_int4_codes_sit_in_llama_cpp_q4_0_blocks():
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    packed = pack_int4(codes)
    # byte j of a 32-input run: input j in the low nibble, input j + 16 in the high nibble
    assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 16].item() << 4)
    assert packed[0, 16].item() == codes[0, 32].item() | (codes[0, 48].item() << 4)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("spec", [QuantSpec(8, 32), QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(4, 32, True)],
                         ids=lambda s: s.name)
def test_an_input_size_the_groups_do_not_divide_is_padded_with_zeros(spec):
    torch.manual_seed(0)
    w = torch.randn(8, 132) * 0.05  # 132 inputs: 4.125 groups of 32
    stored = quantize(w, spec)
    kp = spec.padded(132)
    assert kp == (160 if spec.group_size == 32 else 256) and not spec.fits(132)
    assert stored["scales"].shape == (8, kp // spec.group_size)
    back = dequantize(spec, **stored, in_features=132)
    assert back.shape == (8, 132)
    assert (dequantize(spec, **stored)[:, 132:] == 0).all() or spec.asymmetric  # zeros stay zero (symmetric)
    layer = QuantLinear(132, 8, spec)
    layer.set_dense(w)
    x = torch.randn(3, 132)
    torch.testing.assert_close(layer(x), x @ back.T)


def test_format_names_parse_to_specs():
    assert parse_quantize("int4") == QuantSpec(4, 32)
    assert parse_quantize("INT8-channel") == QuantSpec(8, 0)
    assert parse_quantize("int4-asym-g128") == QuantSpec(4, 128, asymmetric=True)
    for bad in ("int3", "int4-g48", "int8-asym", "int4-g", "int4-channel", "fp8"):
        with pytest.raises(QuantError, match=repr(bad)):
            parse_quantize(bad)


def test_bad_specs_and_shapes_are_refused():
    with pytest.raises(QuantError, match="bits"):
        QuantSpec(3, 32)
    with pytest.raises(QuantError, match="group_size"):
        QuantSpec(4, 48)
    with pytest.raises(QuantError, match="per-channel"):
        QuantSpec(4, 0)
    with pytest.raises(QuantError, match=r"\[4, 0\] matrix"):
        quantize(torch.randn(4, 0), QuantSpec(4, 32))
    with pytest.raises(QuantError, match="inf or nan"):
        quantize(torch.tensor([[float("nan")] * 32]), QuantSpec(8, 32))


def test_policy_names_every_matrix_and_why_some_stay_dense(dense_folder):
    model = load(dense_folder)
    config = plan(model, 4, 32, include_vision=True)
    text = [n for n in config.modules if ".text_model.layers." in n]
    assert len(text) == 3 * 7  # q k v o gate up down in each of the 3 layers
    assert config.modules["lm_head"] == config.modules["model.text_model.embed_tokens"] == QuantSpec(8, 32)
    assert "model.vision_model.encoder.layers.0.self_attn.q_proj" in config.modules
    assert config.modules["model.vision_model.encoder.layers.0.mlp.fc2"] == QuantSpec(4, 32)  # 48 inputs: padded
    without = plan(model, 4, 32)
    assert not any("vision" in n or "connector" in n for n in without.modules)
    with torch.device("meta"):
        untied = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(tiny_config(model_type="idefics3")))
    for spec in (QuantSpec(4, 32), QuantSpec(4, 128, True), QuantSpec(8, 0)):
        own = plan(untied, spec.bits, spec.group_size, asymmetric=spec.asymmetric)  # the head: int8, the table: body's
        assert own.modules["lm_head"] == QuantSpec(8, 32) and own.modules["model.text_model.embed_tokens"] == spec
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))).modules == config.modules


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g64", "int8-channel", "int4-asym"])
def test_quantised_model_equals_its_dequantised_weights_and_its_folder_round_trips(tmp_path, dense_folder, name):
    ids = torch.randint(0, 49000, (2, 17), generator=torch.Generator().manual_seed(1))
    quantised = load(dense_folder, quantize=name)
    assert isinstance(quantised.model.text_model.layers[0].mlp.gate_proj, QuantLinear)
    assert quantised.lm_head.qweight.data_ptr() == quantised.model.text_model.embed_tokens.qweight.data_ptr()
    logits = quantised(input_ids=ids).logits
    # the reference: the same weights dequantised into the dense model
    reference = load(dense_folder)
    with torch.no_grad():
        for module_name in quantised.quantization.modules:
            module = quantised.get_submodule(module_name)
            reference.get_submodule(module_name).weight.copy_(module.dequantized())
    torch.testing.assert_close(logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    quantised.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "idefics3" and len(stored["modules"]) == len(quantised.quantization.modules)
    again = load(tmp_path)
    assert torch.equal(again(input_ids=ids).logits, logits)
    assert again.quantization.modules == quantised.quantization.modules


def test_quantising_a_loaded_model_equals_quantising_while_loading(dense_folder):
    dense = load(dense_folder)
    record = quantize_model(dense, plan(dense, 4, 32))
    on_load = load(dense_folder, quantize="int4")
    ids = torch.tensor([[5, 77, 901, 4000]])
    assert torch.equal(dense(input_ids=ids).logits, on_load(input_ids=ids).logits)
    record.undo()
    assert type(dense.lm_head) is torch.nn.Linear


def test_weight_memory_shrinks_as_the_formats_promise(dense_folder):
    dense = load(dense_folder, dtype="bfloat16")
    bf16 = quantized_nbytes(dense)
    int8 = quantized_nbytes(load(dense_folder, dtype="bfloat16", quantize="int8", include_vision=True))
    int4 = quantized_nbytes(load(dense_folder, dtype="bfloat16", quantize="int4", include_vision=True))
    assert int4 < int8 < bf16 * 0.6


def test_dequantize_model_gives_a_dense_full_precision_model(tmp_path, dense_folder):
    quantised = load(dense_folder, quantize="int4")
    ids = torch.tensor([[5, 77, 901, 4000]])
    before = quantised(input_ids=ids).logits
    dequantize_model(quantised, torch.float32)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in quantised.modules())
    assert quantised.lm_head.weight is quantised.model.text_model.embed_tokens.weight
    torch.testing.assert_close(quantised(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    quantised.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def _copy(folder, to):
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_damaged_quantised_folders_name_the_file_and_tensor(tmp_path, dense_folder):
    good = tmp_path / "good"
    load(dense_folder, quantize="int4").save_pretrained(good)
    key = "model.text_model.layers.1.mlp.up_proj.scales"

    missing = _copy(good, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors[key]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load(missing)

    wrong = _copy(good, tmp_path / "wrong")
    tensors = load_file(wrong / "model.safetensors")
    tensors[key] = tensors[key].float()
    save_file(tensors, wrong / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj\.scales is stored as torch.float32"):
        load(wrong)

    unknown = _copy(good, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantError, match="'gptq'"):
        load(unknown)

    with pytest.raises(QuantError, match="already quantised"):
        load(good, quantize="int8")
    with pytest.raises(QuantError, match="unknown quantisation 'int3'"):
        load(dense_folder, quantize="int3")
