"""The one way features change a built model from outside: replace some of its modules, and undo it.

Kernels (idefics3/kernels), LoRA (finetune/lora.py) and activation recomputation (finetune/recompute.py) all
change a model through `replace_modules`: a function chooses, module by module, a replacement, and the
returned `Replacements` record puts the originals back. The model files never learn about any of them.

Two kinds of replacement keep the checkpoint keys unchanged:
- a wrapper that holds the original as a child under a name the feature owns (LoRA's `base_layer`);
- a *view* (`view_as`): an instance of a subclass of the module's class that shares the original's
  parameters, buffers, children and hooks, and overrides a method or two (a faster `forward`, a recomputed
  one). Parameter names, `state_dict` keys and optimiser state are exactly those of the original.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def view_as(module: nn.Module, cls: type[M]) -> M:
    """A `cls` (a subclass of the module's class) over the very same parameters, buffers, children and hooks."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    view = cls.__new__(cls)
    view.__dict__.update(module.__dict__)  # the same _parameters/_modules/_buffers/hook dicts: shared state
    return view


@dataclass
class Replacements:
    """What `replace_modules` changed, oldest first: (parent, child name, original module)."""

    changed: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.changed)

    def names(self) -> list[str]:
        return [name for _, name, _ in self.changed]

    def undo(self) -> None:
        """Put every original module back (newest first)."""
        for parent, child, original in reversed(self.changed):
            parent._modules[child] = original
        self.changed.clear()


def replace_modules(root: nn.Module, choose: Callable[[str, nn.Module], nn.Module | None]) -> Replacements:
    """Replace each submodule `m` (named `name` under root) by choose(name, m) where that is not None.

    Modules are visited in `named_modules` order as it was before the call, parents before children; a view's
    children are the original's and are visited too (under the same names), so nested replacements compose.
    Returns the record to undo them.
    """
    record = Replacements()
    for name, _ in list(root.named_modules())[1:]:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = root.get_submodule(parent_name) if parent_name else root
        except AttributeError:
            continue  # inside a module replaced above by one without this child (a LoRA wrapper unwrapped)
        current = parent._modules.get(child)
        if current is None:
            continue
        new = choose(name, current)
        if new is None or new is current:
            continue
        parent._modules[child] = new
        record.changed.append((parent, child, current))
    return record
