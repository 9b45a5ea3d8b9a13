"""The decoder's prefill attention through the C++ kernel: same logits in bf16, same tokens, training untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from checkpoints import tiny_config
from fusing import fuse_text
from idefics3 import Engine, Idefics3Config, Idefics3ForConditionalGeneration
from idefics3.kernels import cpu_attention
from idefics3.kernels.backend import install_backend
from idefics3.kernels.cpu_text import FusedTextAttention
from inputs import engine_tokens

TEXT = {"vocab_size": 1001, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 256, "num_hidden_layers": 2}


def tiny_model(dtype: torch.dtype = torch.bfloat16) -> Idefics3ForConditionalGeneration:
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(tiny_config(text=TEXT, model_type="idefics3")))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model.to(dtype).eval()


def prefill_logits(model, ids, prefix: int = 0):
    """Logits of a cached prefill of ids[prefix:] after ids[:prefix] (the engine's path)."""
    cache = model.make_cache(1, 128)
    out = None
    for start, end in ((0, prefix), (prefix, ids.shape[1])):
        if end > start:
            pos = torch.arange(start, end)[None]
            out = model(ids[:, start:end], position_ids=pos, kv_cache=cache, cache_slots=torch.tensor([0]),
                        kv_len=end).logits
    return out.float()


@pytest.mark.parametrize("prefix", [0, 23])
def test_bf16_prefill_logits_match_the_plain_path(attention_kernel, prefix, monkeypatch):
    plain = tiny_model()
    fused = copy.deepcopy(plain)
    assert fuse_text(fused) == 2 and fuse_text(fused) == 0
    ids = torch.randint(5, 1000, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = prefill_logits(plain, ids, prefix), prefill_logits(fused, ids, prefix)
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
    calls = []  # and the kernel really ran: once per layer and prefill call
    original = cpu_attention._run
    monkeypatch.setattr(cpu_attention, "_run", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode():
        prefill_logits(fused, ids, prefix)
    assert len(calls) == 2 * (2 if prefix else 1)


def test_the_backend_installs_it_and_greedy_tokens_agree(attention_kernel, monkeypatch):
    monkeypatch.setenv("IDEFICS3_CALIBRATE", "0")  # the kernel even where SDPA is timed faster
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in (40, 25, 33)]

    def run(fast: bool) -> list[list[int]]:
        model = tiny_model()
        backend = install_backend(model, "auto" if fast else "torch")
        engine = Engine(model, max_batch=2, max_seq_len=96, eos_token_ids=[0], backend=backend)
        assert any(isinstance(m, FusedTextAttention) for m in model.modules()) == fast
        return engine_tokens(engine, prompts, max_new_tokens=6)

    assert run(True) == run(False)


def test_training_keeps_sdpa_and_its_gradients():
    plain = tiny_model(torch.float32).train()
    fused = copy.deepcopy(plain)
    fuse_text(fused)
    ids = torch.randint(5, 1000, (1, 30), generator=torch.Generator().manual_seed(3))
    for m in (plain, fused):
        m(ids).logits.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_switch_off(monkeypatch):
    monkeypatch.setenv("IDEFICS3_KERNELS", "0")
    model = tiny_model()
    backend = install_backend(model)
    assert backend.impl("prefill attention") == "torch"
    assert not any(isinstance(m, FusedTextAttention) for m in model.modules())


def test_engine_leaves_the_model_alone():  # on every machine: before, any CPU engine swapped the classes
    model = tiny_model()
    classes = [type(m) for m in model.modules()]
    Engine(model, max_batch=1, max_seq_len=16, eos_token_ids=[0])
    assert [type(m) for m in model.modules()] == classes
