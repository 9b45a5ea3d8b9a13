"""model/replace.py: the one way features change a model; views keep names and weights, undo restores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idefics3.model.replace import replace_modules, view_as


class Double(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 3)))


def test_views_share_parameters_and_names_and_undo_restores():
    model = net()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4)
    y = model(x)
    record = replace_modules(model, lambda name, m: view_as(m, Double) if type(m) is nn.Linear else None)
    assert record.names() == ["0", "0"] and len(record) == 2  # child names under their parents
    assert isinstance(model[0], Double) and isinstance(model[2][0], Double)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert not torch.equal(model(x), y)
    record.undo()
    assert type(model[0]) is nn.Linear and type(model[2][0]) is nn.Linear
    assert torch.equal(model(x), y)


def test_a_view_must_subclass_the_module():
    with pytest.raises(TypeError, match="not a subclass"):
        view_as(nn.ReLU(), Double)


def test_unwrapping_a_wrapper_skips_its_vanished_children():
    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.extra = inner, nn.Linear(1, 1)

    model = net()
    replace_modules(model, lambda name, m: Wrap(m) if name == "0" else None)
    assert isinstance(model[0], Wrap)
    replace_modules(model, lambda name, m: m.inner if isinstance(m, Wrap) else None)
    assert type(model[0]) is nn.Linear
