"""`merge_adapter`: base checkpoint + LoRA adapter folder -> a plain checkpoint (no adapter left).

The result loads in idefics3 and in transformers like any checkpoint; the base's processor, tokenizer and
generation files are copied along, and the dtype is the base checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..model.idefics3 import Idefics3
from ..quant import dequantize_model, quantized_folder_hooks
from .lora import ADAPTER_WEIGHTS, load_adapter, merge_lora, read_adapter_config

log = logging.getLogger(__name__)


def merge_adapter(model: str | Path, adapter: str | Path, output: str | Path, dtype: str = "auto") -> Path:
    """Load `model`, apply the adapter at `adapter`, fold it into the weights and save to `output`."""
    read_adapter_config(adapter)  # a missing or unsupported adapter fails before the base model is loaded
    if not (Path(adapter) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in the adapter folder {adapter}")
    base = Idefics3.from_pretrained(model, dtype=dtype, hooks=quantized_folder_hooks)
    settings = load_adapter(base, adapter)
    merge_lora(base)
    dequantize_model(base, base.dtype)  # a quantised base folder merges to full precision too
    base.save_pretrained(output)
    log.info("merged adapter %s (r=%d) into %s -> %s", adapter, settings.r, model, output)
    return Path(output)
