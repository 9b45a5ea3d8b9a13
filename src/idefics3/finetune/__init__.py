"""Fine-tuning Idefics3 / SmolVLM: LoRA or full, on chat-format JSONL or Cauldron-style parquet, one command.

    from idefics3.finetune import finetune
    finetune(model="HuggingFaceTB/SmolVLM-256M-Instruct", data="train.jsonl", output="out/", max_steps=500)

Modules: config (every option), data (reading rows), encode (labels), collate (batches), stream (order,
sharding, bad rows), lora (adapters in PEFT's format), merge (adapter -> plain checkpoint), objective (the loss),
recompute (gradient checkpointing), schedule, checkpoint (atomic, verified), distributed (torchrun, sharded state),
setup (model, optimiser, precision), train (the loop), report (outputs, metrics, model card), cli (the `finetune`
and `merge` subcommands).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "finetune": "idefics3.finetune.train",
    "FinetuneResult": "idefics3.finetune.train",
    "StepInfo": "idefics3.finetune.train",
    "FinetuneConfig": "idefics3.finetune.config",
    "LoraSettings": "idefics3.finetune.lora",
    "LoRALinear": "idefics3.finetune.lora",
    "inject_lora": "idefics3.finetune.lora",
    "merge_lora": "idefics3.finetune.lora",
    "load_adapter": "idefics3.finetune.lora",
    "save_adapter": "idefics3.finetune.lora",
    "merge_adapter": "idefics3.finetune.merge",
    "ConversationEncoder": "idefics3.finetune.encode",
    "Example": "idefics3.finetune.encode",
    "collate": "idefics3.finetune.collate",
    "open_source": "idefics3.finetune.data",
    "BadRow": "idefics3.finetune.data",
    "DataError": "idefics3.finetune.stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idefics3.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
