"""Misspelt keyword arguments raise, naming them; transformers' neutral ones are accepted."""

from __future__ import annotations

import pytest
import torch

from idefics3 import Idefics3ForConditionalGeneration


@pytest.fixture(scope="module")
def tiny_model_ours(tiny_checkpoint):
    return Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def test_forward_rejects_unknown_and_accepts_neutral(tiny_model_ours):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="devcie"):
        tiny_model_ours(ids, devcie="cpu")
    with pytest.raises(ValueError, match="output_attentions"):
        tiny_model_ours(ids, output_attentions=True)
    out = tiny_model_ours(ids, return_dict=True, use_cache=False, output_hidden_states=False)
    assert out.logits.shape[:2] == (1, 3)


def test_from_pretrained_rejects_unknown_and_accepts_neutral(tiny_checkpoint):
    with pytest.raises(TypeError, match="devcie"):
        Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, devcie="cpu")
    with pytest.raises(ValueError, match="backend"):
        Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, backend="fast")
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32,
                                                             trust_remote_code=True, low_cpu_mem_usage=True,
                                                             attn_implementation="sdpa", device_map="cpu")
    assert model.dtype == torch.float32 and model.backend is not None


def test_generate_rejects_unknown(tiny_model_ours):
    with pytest.raises(TypeError, match="max_new_tokenz"):
        tiny_model_ours.generate(input_ids=torch.tensor([[1, 2]]), max_new_tokenz=3)
