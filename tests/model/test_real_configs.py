"""The released configurations, built on the meta device, have transformers' parameter names, shapes and count."""

from __future__ import annotations

import pytest
import torch

from idefics3 import Idefics3Config, Idefics3ForConditionalGeneration
from idefics3.presets import PRESETS, preset

# Published parameter counts where the spec gives them.
KNOWN_COUNTS = {"SmolVLM-256M-Instruct": 256_484_928}


@pytest.mark.parametrize("name", list(PRESETS))
def test_same_parameters_as_transformers(name):
    from transformers import Idefics3Config as HFConfig
    from transformers import Idefics3ForConditionalGeneration as HFModel

    raw = preset(name)
    with torch.device("meta"):
        ours = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(raw))
        theirs = HFModel(HFConfig(**raw))
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert our_shapes == their_shapes
    count = ours.num_parameters()
    assert count == sum(p.numel() for p in theirs.parameters())
    if name in KNOWN_COUNTS:
        assert count == KNOWN_COUNTS[name]


def test_tokens_per_tile():
    seq = {name: Idefics3Config.from_dict(preset(name)).image_seq_len for name in PRESETS}
    assert seq == {"Idefics3-8B-Llama3": 169, "SmolVLM-256M-Instruct": 64, "SmolVLM-500M-Instruct": 64,
                   "SmolVLM-Instruct": 81}
