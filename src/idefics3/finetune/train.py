"""The fine-tuning loop: `finetune(config)` trains, checkpoints, evaluates and writes the output folder.

One optimiser step reads `grad_accum` micro-batches of `batch_size` examples on every process, counts the
labelled tokens of the whole step over all of them (an all-reduce under torchrun), and backpropagates each
micro-batch's summed loss divided by that count: the step's gradient is the mean over every labelled token,
however the step is split. Then: gradient clipping, AdamW, the learning rate for the next step, metrics. The next
step's examples are read, decoded and tiled on a worker thread meanwhile.

Nothing is lost: every `save_every` steps (and on Ctrl-C / SIGTERM, and at the end when saving is on) the
trainable weights, optimiser, RNG states and each rank's data position are checkpointed atomically; `resume`
continues from the newest intact checkpoint so that later losses equal those of an uninterrupted run. Only rank 0
writes files. The library never prints: progress goes to the `progress` callback and to logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .collate import collate, label_tokens
from .config import FinetuneConfig
from .data import open_source
from .objective import TokenLoss
from .recompute import checkpointed_layers
from .report import MetricsLog, write_outputs
from .schedule import lr_at
from .setup import load_processor, make_encoder, make_optimizer, precision, prepare_model, trainable_named
from .stream import BadRowStats, ExampleStream, iterate_once

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What the progress callback receives after each optimiser step (rank 0 only)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed: float
    eta: float
    epoch: float
    grad_norm: float
    eval_loss: float | None = None


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    interrupted: bool = False
    resumed_from: int | None = None
    bad_rows: dict[str, int] = field(default_factory=dict)


class Trainer:
    def __init__(self, config: FinetuneConfig, world: dist_utils.World,
                 progress: Callable[[StepInfo], None] | None = None) -> None:
        self.config, self.world, self.progress = config, world, progress
        self.out = config.output_dir
        self.metrics = MetricsLog(self.out)
        self.stop_requested = False

    # ------------------------------------------------------------------------------------------ setup
    def _build(self) -> None:
        c, w = self.config, self.world
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        self.precision = precision(c, w.device)
        self.processor = load_processor(c)
        self.model = prepare_model(c, w.device, self.precision)
        self.encoder = make_encoder(c, self.processor, self.model.config)
        self.source = open_source(c.data)
        self.eval_source = open_source(c.eval_data) if c.eval_data else None
        self.loss_module = TokenLoss(self.model, always_run_vision=c.fsdp and w.distributed)
        self.wrapped = dist_utils.wrap(self.loss_module, w, c.fsdp, checkpointed_layers(self.model))
        self.optimizer = make_optimizer(self.model, c, w.device)
        self.trainable = list(trainable_named(self.model).values())
        global_batch = c.batch_size * c.grad_accum * w.size
        self.total_steps = c.max_steps or max(1, math.ceil(c.epochs * len(self.source) / global_batch))
        self.warmup = c.warmup_steps(self.total_steps)
        if c.warmup is not None and self.warmup < c.warmup:
            log.warning("warm-up shortened from %d to %d steps so that the %d-step run reaches lr %g",
                        c.warmup, self.warmup, self.total_steps, c.lr)
        self.pad_id = self.processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.processor.tokenizer.eos_token_id or 0
        self.stats = BadRowStats()  # the stream's, once it exists; until then a resumed checkpoint's
        self.step, self.position, self.elapsed_before, self.resumed_from = 0, 0, 0.0, None

    def _fsdp(self) -> bool:
        return self.config.fsdp and self.world.distributed

    # ------------------------------------------------------------------------------------------ state
    def save(self) -> None:
        """Checkpoint the current step (collective; rank 0 writes)."""
        state = {"positions": dist_utils.gather_objects(self.world, self.position),
                 "rng": dist_utils.gather_objects(self.world, ckpt.rng_state()),
                 "bad_rows": dist_utils.gather_objects(self.world, self._bad_rows().state())}
        trainable = dist_utils.full_trainable_state(self.model, self.wrapped, self._fsdp())
        optimizer = dist_utils.full_optimizer_state(self.wrapped, self.optimizer, self._fsdp())
        if self.world.is_main:
            settings = {k: getattr(self.config, k) for k in FinetuneConfig.RESUME_KEYS}
            info = {"world_size": self.world.size, "positions": state["positions"], "elapsed": self._elapsed(),
                    "bad_rows": state["bad_rows"], "settings": settings, "total_steps": self.total_steps}
            path = ckpt.save_checkpoint(self.out / "checkpoints", self.step, trainable, optimizer, info,
                                        state["rng"], keep=self.config.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        dist_utils.barrier(self.world)

    def _bad_rows(self) -> BadRowStats:
        """This rank's bad rows in the data trained on so far (the stream has read ahead of it)."""
        return self.stats.until(self.position)

    def _resume(self) -> None:
        found = ckpt.latest_valid(self.out / "checkpoints")
        if found is None:
            log.info("no checkpoint in %s; starting from the beginning", self.out / "checkpoints")
            return
        info = found.state
        if info["world_size"] != self.world.size:
            raise ValueError(f"{found.path} was written by {info['world_size']} process(es); resume with the same "
                             f"number (this run has {self.world.size})")
        differs = {k: (v, getattr(self.config, k)) for k, v in info["settings"].items()
                   if k in FinetuneConfig.RESUME_KEYS and v != getattr(self.config, k)}
        if differs:
            raise ValueError(f"--resume with other settings than the checkpointed run: {differs}")
        dist_utils.load_training_state(self.model, self.wrapped, self.optimizer, found.trainable(),
                                       found.optimizer(), self._fsdp())
        ckpt.set_rng_state(found.rng()[self.world.rank])
        self.step, self.position = found.step, info["positions"][self.world.rank]
        self.elapsed_before = float(info.get("elapsed", 0.0))
        self.stats.merge(info["bad_rows"][self.world.rank])
        self.resumed_from = found.step
        if self.world.is_main:
            self.metrics.truncate_after(found.step)
        log.info("resumed from %s (step %d)", found.path, found.step)

    # ------------------------------------------------------------------------------------------ steps
    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _autocast(self) -> contextlib.AbstractContextManager:
        on = self.precision.compute != torch.float32
        return torch.autocast(self.world.device.type, dtype=self.precision.compute, enabled=on)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.world.device, non_blocking=True) for k, v in batch.items()}

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        if not self.world.distributed:
            return contextlib.nullcontext()
        if self._fsdp():
            self.wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def next_micro_batches(self, stream: ExampleStream) -> tuple[list[dict[str, torch.Tensor]], int]:
        """The micro-batches of one step, with the stream position right after them."""
        c = self.config
        micro = [collate([stream.next() for _ in range(c.batch_size)], self.pad_id) for _ in range(c.grad_accum)]
        return micro, stream.position

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """One optimiser step; returns (mean token loss, gradient norm, input tokens over all ranks)."""
        c = self.config
        n_labels, n_inputs = dist_utils.all_sum(self.world, sum(label_tokens(b) for b in micro),
                                                sum(int(b["attention_mask"].sum()) for b in micro))
        lr = lr_at(self.step, c.lr, self.warmup, self.total_steps, c.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for i, batch in enumerate(micro):
            with self._sync_context(i == len(micro) - 1), self._autocast():
                loss_sum = self.wrapped(**self._to_device(batch))
            (loss_sum * (self.world.size / n_labels)).backward()
            total += float(loss_sum.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        (loss_total,) = dist_utils.all_sum(self.world, total)
        return loss_total / n_labels, float(norm), int(n_inputs)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the evaluation data (all ranks take part; each reads its share)."""
        if self.eval_source is None:
            return None
        self.model.eval()
        module = self.wrapped if self._fsdp() else self.loss_module
        examples = iterate_once(self.eval_source, self.encoder, self.world.rank, self.world.size, BadRowStats())
        loss_sum, count, last = 0.0, 0, None
        while True:
            chunk = [e for _, e in zip(range(self.config.batch_size), examples)]
            has_batch = bool(chunk)
            if not dist_utils.any_rank(self.world, has_batch):
                break
            batch = collate(chunk, self.pad_id) if has_batch else last
            if batch is None:  # a rank without evaluation rows still joins the collectives, on a dummy batch
                ids = torch.tensor([[self.pad_id, self.pad_id]])
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            with self._autocast():
                value = float(module(**self._to_device(batch)))
            if has_batch:
                loss_sum, count, last = loss_sum + value, count + label_tokens(batch), batch
        self.model.train()
        total, n = dist_utils.all_sum(self.world, loss_sum, count)
        return total / n if n else None

    # ------------------------------------------------------------------------------------------ run
    def _handle_signal(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        log.warning("%s received: finishing this step, saving a checkpoint and stopping (again to abort)",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def _signals(self):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _check_output(self) -> None:
        existing = ckpt.all_checkpoints(self.out / "checkpoints")
        if existing and not self.config.resume:
            raise FileExistsError(f"{self.out} already holds checkpoints of a run; pass --resume to continue it or "
                                  "choose another output folder")
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.config.resume:
                self.metrics.path.unlink(missing_ok=True)

    def run(self) -> FinetuneResult:
        c = self.config
        self._check_output()
        self._build()
        if c.resume:
            self._resume()
        stream = ExampleStream(self.source, self.encoder, c.seed, self.world.rank, self.world.size, self.position,
                               c.shuffle, c.strict, self.stats)
        self.started = time.perf_counter()
        loss = eval_loss = None
        step_times: list[float] = []
        interrupted = False
        # Images are decoded and tiled for the next step on a worker thread while this step computes; the
        # checkpointed data position is that of the batches actually trained on.
        with self._signals(), ThreadPoolExecutor(1, thread_name_prefix="idefics3-data") as loader:
            pending = loader.submit(self.next_micro_batches, stream) if self.step < self.total_steps else None
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                micro, position = pending.result()
                if self.step + 1 < self.total_steps:
                    pending = loader.submit(self.next_micro_batches, stream)
                loss, norm, tokens = self.train_step(micro)
                dt = time.perf_counter() - t0
                self.position = position
                eval_loss = self.evaluate() if c.eval_every and self.step % c.eval_every == 0 else None
                if eval_loss is None and self.step == self.total_steps:
                    eval_loss = self.evaluate()
                step_times = (step_times + [dt])[-20:]
                self._record(loss, norm, tokens, dt, eval_loss, sum(step_times) / len(step_times))
                stop = dist_utils.any_rank(self.world, self.stop_requested) if self.world.distributed \
                    else self.stop_requested
                if (c.save_every and self.step % c.save_every == 0) or (stop and self.step < self.total_steps):
                    self.save()
                if stop and self.step < self.total_steps:
                    interrupted = True
                    log.warning("stopped at step %d; rerun with --resume to continue", self.step)
                    break
        if not interrupted:
            if c.save_every and self.step % c.save_every:
                self.save()
        counts = BadRowStats()  # a row bad on one rank may be met by another in a later epoch: counted once
        for per_rank in dist_utils.gather_objects(self.world, self._bad_rows().state()):
            counts.merge(per_rank)
        if not interrupted:
            self._write_outputs(loss, eval_loss, counts)
        return FinetuneResult(self.out, self.step, loss, eval_loss, interrupted, self.resumed_from, dict(counts.counts))

    def _write_outputs(self, loss: float | None, eval_loss: float | None, counts: BadRowStats) -> None:
        c = self.config
        trainable = dist_utils.full_trainable_state(self.model, self.wrapped, self._fsdp())  # collective
        if self.world.is_main:
            summary = {"train_rows": len(self.source), "bad_rows": counts.summary(), "steps": self.step,
                       "warmup_steps": self.warmup,
                       "world_size": self.world.size, "dtype": str(self.precision.compute).removeprefix("torch."),
                       "epochs": self.step * c.batch_size * c.grad_accum * self.world.size / len(self.source),
                       "final_loss": None if loss is None else round(loss, 4),
                       "eval_loss": None if eval_loss is None else round(eval_loss, 4)}
            write_outputs(c, self.model, self._fsdp(), self.processor, trainable, summary, self.precision.saved)
            log.info("wrote %s (%s)", self.out, counts.summary())
        dist_utils.barrier(self.world)

    def _record(self, loss: float, norm: float, tokens: int, dt: float, eval_loss: float | None,
                mean_dt: float) -> None:
        if not self.world.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        epoch = self.position * self.world.size / len(self.source)
        row = {"step": self.step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
               "tokens_per_s": tokens / dt, "grad_norm": norm, "time": round(self._elapsed(), 3)}
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        self.metrics.append(row)
        if self.progress is not None:
            self.progress(StepInfo(self.step, self.total_steps, loss, lr, tokens / dt, self._elapsed(),
                                   mean_dt * (self.total_steps - self.step), epoch, norm, eval_loss))


def finetune(config: FinetuneConfig | None = None, progress: Callable[[StepInfo], None] | None = None,
             **options: Any) -> FinetuneResult:
    """Fine-tune a model: `finetune(model=..., data=..., output=..., **options)` or `finetune(FinetuneConfig(...))`.

    Under torchrun the same call trains data-parallel; only rank 0 writes files."""
    if config is None:
        config = FinetuneConfig(**options)
    elif options:
        raise TypeError("pass either a FinetuneConfig or keyword options, not both")
    world = dist_utils.setup(config.device)
    try:
        return Trainer(config, world, progress).run()
    finally:
        dist_utils.teardown(world)
