"""GPTQ (quant/gptq.py): our formats exactly, rounding to nearest where the inputs are uncorrelated, a smaller
output error than rounding where they are, Hessians from the model's own inputs (shared by q/k/v and gate/up,
in passes that fit a memory budget), and `idefics3 quantize --calibration` end to end with its bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from idefics3.quant import QuantSpec, dequantize, quantize
from idefics3.quant.apply import plan, quantize_model
from idefics3.quant.format import QuantError, check_tensors
from idefics3.quant.gptq import calibration_windows, collect_hessians, gptq_quantize
from idefics3.quant.modules import QuantLinear
from kernels.test_cpu_decode import tiny_model
from test_cli import cli

SPECS = [QuantSpec(8, 32), QuantSpec(8, 0), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128),
         QuantSpec(4, 32, True), QuantSpec(4, 128, True)]


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("k", [256, 200])
def test_uncorrelated_inputs_give_exactly_rounding_to_nearest(spec, k):
    """H diagonal: no error spreads, so whatever the act order, every stored tensor equals quantize's with H's
    diagonal as the importance (padded inputs included)."""
    w = weights(24, k)
    h = torch.diag(torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5)
    got, want = gptq_quantize(w, h, spec), quantize(w, spec, importance=torch.diag(h))
    check_tensors(spec, (24, k), got, "w")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_correlated_inputs_give_a_smaller_output_error(spec):
    """Inputs with correlated features: GPTQ's outputs on them are closer to the dense layer's than rounding's."""
    gen = torch.Generator().manual_seed(2)
    k = 256
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = torch.randn(2048, k, generator=gen) @ mix  # [T, K]
    w = weights(32, k, seed=3)
    h = 2 * x.T @ x / x.shape[0]
    err = {}
    for name, tensors in (("gptq", gptq_quantize(w, h, spec)), ("rtn", quantize(w, spec))):
        q = dequantize(spec, tensors["qweight"], tensors["scales"], tensors.get("mins"), torch.float32, k)
        err[name] = ((x @ (w - q).T) ** 2).mean()
    assert err["gptq"] < 0.9 * err["rtn"], err


def test_refuses_a_hessian_of_another_size():
    with pytest.raises(QuantError, match="Hessian"):
        gptq_quantize(weights(8, 64), torch.eye(32), QuantSpec(4, 32))


def test_hessians_are_the_inputs_second_moments_in_passes():
    """The hooks' H equals 2 X^T X / T of the inputs the layer saw, whether taken in one pass or one per name."""
    model = tiny_model("gqa-hd16", torch.float32, intermediate_size=96)
    windows = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(4))
    names = ["model.text_model.layers.0.self_attn.q_proj", "model.text_model.layers.1.mlp.down_proj"]
    seen = []
    handle = model.get_submodule(names[1]).register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 96)))
    together = collect_hessians(model, names, windows)
    handle.remove()
    x = torch.cat(seen)[: 3 * 12]  # [T, K]
    assert torch.allclose(together[names[1]], 2 * x.T @ x / x.shape[0], atol=1e-5)
    apart = collect_hessians(model, names, windows, max_bytes=1)  # one name per pass
    for name in names:
        assert torch.allclose(together[name], apart[name], atol=1e-6)
    with pytest.raises(QuantError, match="non-empty"):
        collect_hessians(model, names, torch.zeros(0, 5, dtype=torch.long))


def test_calibration_windows():
    assert calibration_windows(list(range(1300)), tokens=1200, window=512).shape == (2, 512)
    assert calibration_windows(list(range(100)), tokens=4096).shape == (1, 100)
    with pytest.raises(QuantError, match="tokens"):
        calibration_windows(list(range(5)))


def test_quantize_model_with_calibration_beats_rounding_on_its_text():
    """A model quantised by GPTQ on some text (int4) predicts that text's next tokens closer to the dense model
    than the rounded one does, and records how it was made; embeddings and the tied head stay rounded."""
    dense = tiny_model("mha-hd64-tied", torch.float32, intermediate_size=128)
    text = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = dense(input_ids=text).logits
    out = {}
    for name, calibration in (("rtn", None), ("gptq", text)):
        model = tiny_model("mha-hd64-tied", torch.float32, intermediate_size=128)
        config = plan(model, 4, 32)
        quantize_model(model, config, calibration)
        with torch.inference_mode():
            out[name] = ((model(input_ids=text).logits - ref) ** 2).mean()
        if calibration is not None:
            assert "GPTQ on 128 calibration tokens" in config.source
            assert isinstance(model.lm_head, QuantLinear)
            embed = model.model.text_model.embed_tokens
            assert torch.equal(embed.qweight, quantize(dense.model.text_model.embed_tokens.weight,
                                                       embed.spec)["qweight"])
    assert out["gptq"] < out["rtn"], out


def quantize_by_gptq(checkpoint, out, calibration: str):
    """`idefics3 quantize --bits 4 --calibration <calibration>` on 256 tokens: the run (which must succeed), after
    checking that the folder records GPTQ on those tokens and generates."""
    res = cli("quantize", "--model", str(checkpoint), "--bits", "4", "--calibration", calibration,
              "--calibration-tokens", "256", "--output", str(out))
    assert res.returncode == 0, res.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "GPTQ on 256 calibration tokens" in config["source"]
    assert cli("generate", "--model", str(out), "--max-new-tokens", "2", "hi").returncode == 0
    return res


def test_cli_calibration(tmp_path, tiny_checkpoint):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the <image> lazy dog. " * 40, encoding="utf-8")  # no pixels
    res = quantize_by_gptq(tiny_checkpoint, tmp_path / "gptq", str(text))
    assert "GPTQ on" in res.stdout
    missing = cli("quantize", "--model", str(tiny_checkpoint), "--calibration", str(tmp_path / "nope.txt"),
                  "--output", str(tmp_path / "x"))
    assert missing.returncode != 0 and "--calibration" in missing.stderr and "nope.txt" in missing.stderr
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    res = cli("quantize", "--model", str(tiny_checkpoint), "--calibration", str(binary), "--output",
              str(tmp_path / "y"))
    assert res.returncode != 0 and "UTF-8" in res.stderr
    short = tmp_path / "short.txt"
    short.write_text("hi", encoding="utf-8")
    res = cli("quantize", "--model", str(tiny_checkpoint), "--calibration", str(short), "--output", str(tmp_path / "z"))
    assert res.returncode != 0 and "tokens" in res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_self_calibration_is_the_models_own_sampled_text(tiny_checkpoint):
    """The model's sampled answers to the built-in requests, with their prompts: windows of token ids, no
    <image>, the same for the same seed and not for another; a budget below GPTQ's minimum is refused."""
    from idefics3 import load_model, load_processor
    from idefics3.quant import self_calibration
    from idefics3.quant.self_calibration import PROMPTS

    model, processor = load_model(tiny_checkpoint, device="cpu", dtype="fp32"), load_processor(tiny_checkpoint)
    windows = self_calibration(model, processor, tokens=320, window=64)
    assert windows.dtype == torch.long and windows.shape == (5, 64)
    assert not (windows == processor.image_token_id).any()
    assert torch.equal(windows, self_calibration(model, processor, tokens=320, window=64))
    assert not torch.equal(windows, self_calibration(model, processor, tokens=320, seed=1, window=64))
    first = processor.tokenizer(processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}], add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    assert windows.flatten()[: len(first)].tolist() == first  # the first request's prompt, then its answer
    for side in ("left", "right"):  # prompts padded on either side give the same text
        processor.tokenizer.padding_side = side
        assert torch.equal(self_calibration(model, processor, tokens=320, window=64), windows), side
    with pytest.raises(QuantError, match="at least 16"):
        self_calibration(model, processor, tokens=8)


def test_cli_self_calibration(tmp_path, tiny_checkpoint):
    res = quantize_by_gptq(tiny_checkpoint, tmp_path / "self", "self")
    assert "writing 256 tokens of calibration text" in res.stderr
