"""Names of the weight dtypes and devices: one table for every entry point (CLI flags, loading, fine-tuning).

Kept free of a torch import, so the command line can list the choices without loading torch (a fast `--help`).
"""

from __future__ import annotations

from typing import Any

SHORT_NAMES = ("bf16", "fp16", "fp32")  # what the CLI flags offer
DEVICES = ("cpu", "cuda", "mps")  # the device kinds a model loads on
# every spelling we accept -> the torch attribute name
NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
         "fp32": "float32", "float32": "float32", "float": "float32"}


def to_torch_dtype(dtype: Any) -> Any:
    """A torch dtype from a torch dtype or a name ("bf16", "bfloat16", "torch.float16")."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in NAMES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of: {', '.join(SHORT_NAMES)}, auto)")
    return getattr(torch, NAMES[name])
