"""Shared pieces of the benchmarks: writing a random checkpoint of a real shape, alternating runs, medians,
and what ran where (the CPU and its ISA, each op's implementation).

Benchmarks compare against transformers (or another named peer) side by side in one run, A B A B,
because these machines are shared and noisy: ratios measured together are what we trust. Each bench that
prints figures also prints `machine_line()` and, for a loaded model, `backend_lines(model.backend)`, so a
figure always says which kernel produced it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from idefics3 import Idefics3, Idefics3Config
from idefics3.device import cpu_description
from idefics3.presets import preset

# Where the benches write their random checkpoints (reused between runs); every script has --dir to change it.
BENCH_DIR = Path(tempfile.gettempdir()) / "idefics3-bench"
# The CPU features that decide which kernel runs (kernels/backend.py), as `idefics3 info` names them.
def machine_line(threads: int | None = None) -> str:
    """One line: the CPU, its ISA, the torch version and the threads torch uses."""
    threads = threads if threads is not None else torch.get_num_threads()
    return f"cpu: {cpu_description()}, torch {torch.__version__}, {threads} thread(s)"


def backend_lines(backend: Any, label: str = "kernels") -> list[str]:
    """The lines of `backend.describe()` (each op's implementation and why, then the derived weights' memory)
    under a heading. `backend`: a Backend, those lines already taken (e.g. from a child process), or None."""
    if backend is None:
        return [f"{label}: none installed (the plain PyTorch path everywhere)"]
    if hasattr(backend, "describe"):
        label, backend = f"{label} (backend {backend.requested!r})", backend.describe()
    return [f"{label}:"] + [f"  {line}" for line in backend]


def write_random_checkpoint(folder: Path, name: str = "SmolVLM-256M-Instruct", dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A checkpoint folder of the preset's exact shapes with seeded random weights (reused if present)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = Idefics3Config.from_dict(preset(name))
    model = Idefics3(config)  # the plain network: nothing to install for writing weights
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def decode_bytes_per_token(config: Idefics3Config, dtype_bytes: int = 2) -> int:
    """Weight bytes one decode step reads: every decoder matrix plus lm_head (the embedding: one row only)."""
    t = config.text_config
    per_layer = (t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
                 + 3 * t.hidden_size * t.intermediate_size)
    return dtype_bytes * (t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the memory-bandwidth yardstick."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_child(code: str, *args: str) -> dict:
    """Run python code in a fresh process; it prints one JSON line last, which is returned."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(label: str, values: list[float], unit: str) -> str:
    med = statistics.median(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{label:<28} median {med:9.3f} {unit}  (±{spread:.3f}, n={len(values)})"
