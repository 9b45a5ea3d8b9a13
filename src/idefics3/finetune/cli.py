"""The `finetune` and `merge` subcommands: argument parsing, a progress bar, and exit codes.

`add_finetune_parser(subparsers)` and `add_merge_parser(subparsers)` add them to any argparse subparsers
object (the `idefics3` CLI; `python -m idefics3.finetune` runs that same CLI). Each parser's `func(args)` returns
the exit code, 0 done or 130 stopped by Ctrl-C after saving a checkpoint, and raises on bad options, data or files
(ValueError, FileNotFoundError, FileExistsError, DataError) with a message naming the problem: the `idefics3` CLI
prints it as one `idefics3: error: ...` line and exits 1, as for its other commands (argparse usage errors exit 2).
Both `func` and `run` are set, for either dispatch convention.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import Any

from .parts import DEFAULT_TARGETS, PARTS  # torch-free, so that building the parser stays fast (--help)
from .schedule import DEFAULT_WARMUP_RATIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressBar:
    """One line on stderr per update: a bar, loss, learning rate, tokens/s and the time left."""

    def __init__(self, stream: Any = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = 0.0

    def __call__(self, info: Any) -> None:
        done = info.step / max(1, info.total_steps)
        filled = int(done * self.width)
        line = (f"step {info.step}/{info.total_steps} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"loss {info.loss:.4f} lr {info.lr:.2e} {info.tokens_per_s:,.0f} tok/s "
                f"ETA {_duration(info.eta)}")
        if info.eval_loss is not None:
            line += f" eval_loss {info.eval_loss:.4f}"
        final = info.step == info.total_steps
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final or info.eval_loss is not None else ""))
        elif final or info.eval_loss is not None or time.monotonic() - self.last >= 10 or info.step == 1:
            self.stream.write(line + "\n")
            self.last = time.monotonic()
        self.stream.flush()


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="fine-tune a model (LoRA or full) on chat JSONL or Cauldron parquet",
                              description="Fine-tune Idefics3 / SmolVLM. Runs data-parallel under torchrun.")
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]}, a parquet file or a folder of them")
    p.add_argument("--eval-data", help="evaluation data in the same formats")
    p.add_argument("--output", required=True, help="output folder")
    g = p.add_argument_group("what is trained")
    g.add_argument("--full", action="store_true", help="train all parameters outside --freeze instead of LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", type=_csv, default=list(DEFAULT_TARGETS),
                   help="Linear names (PEFT rules: a name matches modules ending in it), or all-linear")
    g.add_argument("--quantize", metavar="FORMAT",
                   help="QLoRA: quantise the frozen base while loading (int4, int8, int4-g64, ...); adapters stay "
                        "in full precision, `merge` writes a full-precision checkpoint")
    g.add_argument("--freeze", type=_csv, default=[], help="parts left untouched: " + ",".join(PARTS))
    g.add_argument("--loss-on", choices=("assistant", "all"), default="assistant",
                   help="assistant: answers and their <end_of_utterance> (default); all: every text token")
    g = p.add_argument_group("how long and how fast")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=1, help="examples per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-4)
    warmup = g.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-ratio", type=float, default=DEFAULT_WARMUP_RATIO, metavar="FRACTION",
                        help="linear warm-up over this fraction of the steps (default %(default)s); the warm-up is "
                             "always shorter than the run, so --lr is reached")
    warmup.add_argument("--warmup", type=int, metavar="STEPS",
                        help="warm-up steps instead of --warmup-ratio (cut to the run's steps - 1 if longer)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g = p.add_argument_group("inputs")
    g.add_argument("--longest-edge", type=int, help="resize images to this longest edge (pixels) before tiling")
    g.add_argument("--no-split", action="store_true", help="do not cut images into tiles (one frame per image)")
    g.add_argument("--max-length", type=int, help="skip examples longer than this after image expansion")
    g.add_argument("--no-shuffle", action="store_true")
    g.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    g = p.add_argument_group("compute")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--device", help="e.g. cpu, cuda:0 (default: this process's GPU if any)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model (FSDP2) instead of DDP")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=3)
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (always at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --output")
    g.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_finetune, run=run_finetune)
    return p


def add_merge_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("merge", help="fold a LoRA adapter into its base model and save a plain checkpoint")
    p.add_argument("--model", required=True, help="the base checkpoint folder or Hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default="auto", help="auto (the base's), bf16, fp16 or fp32")
    p.set_defaults(func=run_merge, run=run_merge)
    return p


def _logging() -> None:
    """Progress messages of this package on stderr (rank 0 only), whatever the root logger was set to."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    rank = int(os.environ.get("RANK", "0"))
    logging.getLogger("idefics3.finetune").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _command() -> str:
    """The command line as a user would type it (for the model card)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)} " if world > 1 else ""
    return launcher + "idefics3 finetune " + shlex.join(sys.argv[2:])


def run_finetune(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig
    from .train import finetune

    _logging()
    main = int(os.environ.get("RANK", "0")) == 0
    config = FinetuneConfig(
        model=args.model, data=args.data, output=args.output, eval_data=args.eval_data, full=args.full,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets, freeze=args.freeze, quantize=args.quantize, loss_on=args.loss_on,
        epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, warmup_ratio=args.warmup_ratio, schedule=args.schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, longest_edge=args.longest_edge, no_split=args.no_split,
        max_length=args.max_length, shuffle=not args.no_shuffle, strict=args.strict, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, device=args.device, fsdp=args.fsdp,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
        resume=args.resume, seed=args.seed, command=_command())
    try:  # errors propagate: the CLI prints them as one line
        result = finetune(config, progress=ProgressBar() if main else None)
    except KeyboardInterrupt:  # the first Ctrl-C finishes the step and saves; a second one lands here
        print("aborted without saving (second interrupt)", file=sys.stderr)
        return 130
    if not main:
        return 130 if result.interrupted else 0
    if result.bad_rows:
        total = sum(result.bad_rows.values())
        print(f"skipped {total} bad row(s): " + ", ".join(f"{k} {v}" for k, v in sorted(result.bad_rows.items())),
              file=sys.stderr)
    if result.interrupted:
        print(f"interrupted at step {result.steps}; checkpoint saved. Continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    what = "adapter in " + str(result.output / "adapter") if not config.full else "checkpoint in " + str(result.output)
    losses = "".join(f", {name} {value:.4f}" for name, value in (("final loss", result.final_loss),
                                                                 ("eval loss", result.eval_loss)) if value is not None)
    print(f"done: {result.steps} steps{losses}; {what}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    _logging()
    out = merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype)  # errors propagate to the CLI
    print(f"merged checkpoint written to {out}")
    return 0
