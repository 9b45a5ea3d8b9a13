"""Turning a `FinetuneConfig` into the pieces a run needs: processor, encoder, model with its trainable set, optimiser.

Precision: with `bf16` the matrix multiplications run under autocast. In LoRA mode the frozen base weights are
loaded in bf16 (half the memory) while the adapters stay float32; in full mode the trained weights stay float32
master copies and only the compute is bf16. `auto` picks bf16 on a GPU that supports it and float32 otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Idefics3Config
from ..hub import resolve_model_path
from ..loading import load_processor as load_checkpoint_processor
from ..model.idefics3 import Idefics3
from ..processing.processor import Idefics3Processor
from ..quant import quantize_on_load_hooks, quantized_folder_hooks
from ..weights import parse_dtype
from . import lora as lora_lib
from . import recompute
from .config import FinetuneConfig
from .encode import ConversationEncoder

log = logging.getLogger(__name__)


@dataclass
class Precision:
    weights: torch.dtype  # dtype the base model is loaded in
    compute: torch.dtype  # autocast dtype (float32: no autocast)
    saved: torch.dtype  # dtype of a full checkpoint written at the end (the base checkpoint's own)


def precision(config: FinetuneConfig, device: torch.device) -> Precision:
    folder = resolve_model_path(config.model)
    saved = parse_dtype("auto", Idefics3Config.from_pretrained(folder))
    name = config.dtype
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16" if cuda_bf16 else "fp32"
    compute = torch.bfloat16 if name == "bf16" else torch.float32
    weights = compute if not config.full else torch.float32
    return Precision(weights, compute, saved)


def load_processor(config: FinetuneConfig) -> Idefics3Processor:
    return load_checkpoint_processor(config.model, longest_edge=config.longest_edge, split=not config.no_split)


def make_encoder(config: FinetuneConfig, processor: Idefics3Processor, model_config: Idefics3Config
                 ) -> ConversationEncoder:
    max_length = config.max_length or model_config.text_config.max_position_embeddings
    return ConversationEncoder(processor, loss_on=config.loss_on, max_length=max_length)


def freeze_parts(model: nn.Module, parts: list[str]) -> None:
    for name, p in model.named_parameters():
        if lora_lib.part_of(name) in parts:
            p.requires_grad_(False)


def prepare_model(config: FinetuneConfig, device: torch.device, prec: Precision) -> Idefics3:
    """Load the base network (no kernels, no generation state: training runs the plain path) and make exactly
    the right parameters trainable (LoRA adapters or unfrozen parts)."""
    # a quantised base (--quantize, or a quantised folder) stays frozen in its format: QLoRA
    hooks = quantized_folder_hooks if config.quantize is None else (lambda _: quantize_on_load_hooks(config.quantize))
    model = Idefics3.from_pretrained(config.model, dtype=prec.weights, device=device, hooks=hooks)
    if config.full and getattr(model, "quantization", None) is not None:
        raise ValueError(f"{config.model} is quantised: train LoRA adapters on it, not --full")
    if config.full:
        for p in model.parameters():
            p.requires_grad_(True)
        freeze_parts(model, config.freeze)
    else:
        lora_lib.inject_lora(model, config.lora_settings())
        lora_lib.mark_only_lora_trainable(model)
    if config.gradient_checkpointing:
        recompute.enable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, model.num_parameters(),
             100 * trainable / max(1, model.num_parameters()))
    return model.train()


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or other vectors)."""
    params = trainable_named(model).values()
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda" and not config.fsdp)
