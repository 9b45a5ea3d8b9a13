"""oneDNN epilogue fusion of the vision encoder: same features, same tokens, same weights, training untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from checkpoints import tiny_config
from fusing import fuse_vision
from idefics3 import Idefics3Config, Idefics3ForConditionalGeneration
from idefics3.finetune.lora import LoraSettings, inject_lora
from idefics3.kernels import cpu_vision
from idefics3.kernels.backend import install_backend
from idefics3.kernels.cpu_vision import FusedLinear, FusedVisionMLP, VisionKernels
from idefics3.kernels.derived import DerivedWeights

VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}


def tiny_model(dtype: torch.dtype = torch.float32) -> Idefics3ForConditionalGeneration:
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(
        tiny_config(vision=VISION, text={"vocab_size": 1001}, model_type="idefics3")))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model.to(dtype).eval()


def frames(model: Idefics3ForConditionalGeneration, n: int = 3) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.randn(1, n, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, N, 3, H, W]


def test_fp32_features_equal_the_plain_path_and_bf16_stays_close():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        plain = tiny_model(dtype)
        fused = copy.deepcopy(plain)
        kernels = VisionKernels(DerivedWeights(), attention_kernel=True)
        assert fuse_vision(fused, kernels) == 2 * (1 + 1 + 1 + 4)  # per layer: itself, MLP, attention, projections
        pixels = frames(plain).to(dtype)
        with torch.inference_mode():
            a, b = plain.get_image_features(pixels).float(), fused.get_image_features(pixels).float()
        assert (a - b).abs().max() <= tol * a.abs().max(), dtype
        assert kernels.broken is None


def test_same_objects_names_and_weights_and_idempotent():
    model = tiny_model()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fuse_vision(model)
    assert fuse_vision(model) == 0
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    layer = model.model.vision_model.encoder.layers[0]
    assert isinstance(layer.mlp, FusedVisionMLP) and isinstance(layer.self_attn.q_proj, FusedLinear)
    assert isinstance(layer.self_attn.q_proj, nn.Linear)  # LoRA still finds it (below)


def test_switch_off_changes_nothing(monkeypatch):
    monkeypatch.setenv("IDEFICS3_KERNELS", "0")
    model = tiny_model()
    backend = install_backend(model)
    assert len(backend.replacements) == 0 and backend.impl("vision layers") == "torch"
    assert "IDEFICS3_KERNELS=0" in backend.choices["vision layers"].reason
    assert type(model.model.vision_model.encoder.layers[0].mlp).__name__ == "VisionMLP"


def test_the_backend_installs_and_removes_it(monkeypatch):
    monkeypatch.setenv("IDEFICS3_CALIBRATE", "0")  # the fused layers even where the plain ones time faster
    model = tiny_model()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    backend = install_backend(model)
    assert backend.impl("vision layers") != "torch"
    assert isinstance(model.model.vision_model.encoder.layers[0].mlp, FusedVisionMLP)
    backend.remove()
    assert type(model.model.vision_model.encoder.layers[0].mlp).__name__ == "VisionMLP"
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_training_takes_the_plain_path_with_the_same_gradients():
    plain = tiny_model().train()
    fused = copy.deepcopy(plain)
    fuse_vision(fused)
    pixels = frames(plain)
    for m in (plain, fused):
        m.get_image_features(pixels).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_lora_after_fusion_adapts_the_vision_projections():
    model = tiny_model()
    fuse_vision(model)
    names = inject_lora(model, LoraSettings(r=2, alpha=4, targets=["q_proj", "fc1"]))
    assert any(n.startswith("model.vision_model.") and n.endswith("q_proj") for n in names)
    assert any(n.endswith("mlp.fc1") for n in names)
    with torch.inference_mode():
        model.get_image_features(frames(model))  # LoRA children: the MLP falls back to the plain path


def test_a_refusing_onednn_falls_back_once_with_the_plain_result(monkeypatch, caplog):
    plain = tiny_model()
    fused = copy.deepcopy(plain)
    kernels = VisionKernels(DerivedWeights(), attention_kernel=True)
    fuse_vision(fused, kernels)

    def refuse(*args, **kwargs):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(cpu_vision, "_linear", refuse)
    pixels = frames(plain)
    with torch.inference_mode():
        a, b = plain.get_image_features(pixels), fused.get_image_features(pixels)
    assert torch.equal(a, b)
    assert kernels.broken and "no oneDNN here" in caplog.text


def test_the_stacked_qkv_weights_follow_changes_to_the_projections():
    plain = tiny_model(torch.bfloat16)
    fused = copy.deepcopy(plain)
    fuse_vision(fused)
    pixels = frames(plain).to(torch.bfloat16)
    with torch.inference_mode():
        fused.get_image_features(pixels)  # builds the stacked copy
    for model in (plain, fused):
        with torch.no_grad():
            model.model.vision_model.encoder.layers[0].self_attn.k_proj.weight.mul_(-1.5)  # in place
            model.model.vision_model.encoder.layers[1].self_attn.v_proj.bias.zero_()
    with torch.inference_mode():
        a, b = plain.get_image_features(pixels).float(), fused.get_image_features(pixels).float()
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
