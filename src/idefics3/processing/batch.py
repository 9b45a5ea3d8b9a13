"""`BatchFeature`: the processor's output, a dict of model inputs that also reads as attributes.

`model(**inputs)` works because it is a plain dict; `inputs.input_ids` works through attribute access.
`.to(device)` moves every tensor; `.to(dtype)` casts only floating tensors (pixel values), never the integer ids
and masks, as transformers does.

Shapes (return_tensors="pt"):
    input_ids, attention_mask   [B, T] int64
    pixel_values                [B, N_frames, 3, H, W] float32 (all-zero frames pad samples with fewer frames)
    pixel_attention_mask        [B, N_frames, H, W] int64
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_TENSOR_TYPES = (None, "pt", "np")


def _is_nested_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and (not value or not isinstance(value[0], str))


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        lengths = {len(row) for row in value}
        if len(lengths) > 1:
            raise ValueError(f"cannot make a tensor of {key!r}: its rows have different lengths {sorted(lengths)}; "
                             "pass padding=True (or return_tensors=None)")
    try:
        return np.asarray(value)
    except ValueError as err:  # ragged nested lists of arrays
        raise ValueError(f"cannot make a tensor of {key!r}: {err}; pass padding=True or do_pad=True, "
                         "or return_tensors=None") from err


class BatchFeature(dict):
    """Model inputs by name; `return_tensors` "pt" gives torch tensors, "np" numpy arrays, None leaves lists."""

    def __init__(self, data: dict[str, Any] | None = None, tensor_type: str | None = None) -> None:
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no field {name!r}; it has {sorted(self)}") from None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.update(state)

    def convert_to_tensors(self, tensor_type: str | None) -> BatchFeature:
        """Convert list and array values in place to `tensor_type` ("pt", "np" or None for no change)."""
        if tensor_type not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of {list(_TENSOR_TYPES)}, got {tensor_type!r}")
        if tensor_type is None:
            return self
        for key, value in self.items():
            if not (isinstance(value, (np.ndarray, torch.Tensor)) or _is_nested_sequence(value)):
                continue
            if tensor_type == "pt":
                if isinstance(value, torch.Tensor):
                    continue
                if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
                    self[key] = torch.stack(list(value))
                    continue
                self[key] = torch.from_numpy(_to_numpy(key, value))
            else:
                self[key] = value.numpy() if isinstance(value, torch.Tensor) else _to_numpy(key, value)
        return self

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move tensors to a device and/or cast floating tensors to a dtype (in place; returns self)."""
        device = kwargs.get("device")
        if device is None and args:
            first = args[0]
            if isinstance(first, (str, int, torch.device)):
                device = first
            elif not isinstance(first, torch.dtype):
                raise ValueError(f"BatchFeature.to expects a device or a dtype, got {first!r}")
        non_blocking = kwargs.get("non_blocking", False)
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                if torch.is_floating_point(value):
                    self[key] = value.to(*args, **kwargs)
                elif device is not None:
                    self[key] = value.to(device=device, non_blocking=non_blocking)
        return self
