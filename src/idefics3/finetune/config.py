"""`FinetuneConfig`: every option of a fine-tuning run, checked once, shared by the CLI and the Python API.

Defaults follow the recipes in the literature: LoRA r=16, alpha=32, dropout 0.05 on the attention and MLP
projections, AdamW at 1e-4 with a linear warm-up over the first 5% of the steps (`warmup_ratio`; `warmup` sets a
number of steps instead; either way shorter than the run) and cosine decay, gradient clipping at 1.0, loss on the
assistant's answers. `--full` trains every parameter outside the frozen parts instead.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..quant import parse_quantize
from .encode import LOSS_MODES
from .lora import LoraSettings
from .parts import DEFAULT_TARGETS, PARTS
from .schedule import DEFAULT_WARMUP_RATIO, warmup_steps

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "fp32", "bf16")


@dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    # what is trained
    full: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    freeze: list[str] = field(default_factory=list)
    quantize: str | None = None  # QLoRA: the frozen base quantised while loading ("int4", "int8", ...)
    loss_on: str = "assistant"
    # how long
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    # optimiser and schedule
    lr: float = 1e-4
    warmup: int | None = None  # warm-up steps; None: warmup_ratio of the run
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    schedule: str = "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # inputs
    longest_edge: int | None = None
    no_split: bool = False
    max_length: int | None = None
    shuffle: bool = True
    strict: bool = False
    # compute
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    device: str | None = None
    fsdp: bool = False
    # bookkeeping
    save_every: int | None = None
    keep_checkpoints: int = 3
    eval_every: int | None = None
    resume: bool = False
    seed: int = 0
    command: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str) and re.fullmatch(r"[\w.,\s-]+", self.lora_targets) \
                and self.lora_targets != "all-linear":  # "q_proj,v_proj" is a list; anything else a regex
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if isinstance(self.freeze, str):
            self.freeze = [p.strip() for p in self.freeze.split(",") if p.strip()]
        unknown = set(self.freeze) - set(PARTS)
        if unknown:
            raise ValueError(f"--freeze takes {', '.join(PARTS)}; got {sorted(unknown)}")
        if self.quantize is not None:
            parse_quantize(self.quantize)  # a bad name fails here, naming it
            if self.full:
                raise ValueError("--quantize keeps the base frozen in int4/int8: train LoRA adapters on it, not --full")
        if self.full and set(self.freeze) == set(PARTS):
            raise ValueError("--full with every part frozen leaves nothing to train")
        checks = [(self.loss_on in LOSS_MODES, f"loss_on must be one of {LOSS_MODES}"),
                  (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
                  (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
                  (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and accumulation must be >= 1"),
                  (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
                  (self.epochs > 0, "epochs must be > 0"), (self.lr > 0, "lr must be > 0"),
                  (self.warmup is None or self.warmup >= 0, "warmup must be >= 0"),
                  (0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio must be in [0, 1]"),
                  (self.save_every is None or self.save_every >= 1, "save_every must be >= 1"),
                  (self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1"),
                  (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not self.full:
            self.lora_settings()  # validates rank, dropout

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps of a run of `total_steps`: `warmup`, else `warmup_ratio` of it; always shorter than it."""
        return warmup_steps(total_steps, self.warmup, self.warmup_ratio)

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            targets=self.lora_targets, exclude_parts=tuple(self.freeze))

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Settings a resumed run must share with the run that wrote the checkpoint.
    RESUME_KEYS = ("model", "data", "full", "quantize", "lora_r", "lora_alpha", "lora_targets", "freeze",
                   "batch_size", "grad_accum", "seed", "shuffle", "loss_on", "fsdp")
