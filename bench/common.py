"""Shared pieces of the benchmarks: writing a random checkpoint of a real shape (whole, or streamed shard by
shard for models too big to build), alternating runs in fresh processes (optionally under a capped instruction
set), medians, and what ran where (the CPU and its ISA, each op's implementation).

Benchmarks compare against transformers (or another named peer) side by side in one run, A B A B,
because these machines are shared and noisy: ratios measured together are what we trust. Each bench that
prints figures also prints `machine_line()` and, for a loaded model, `backend_lines(model.backend)`, so a
figure always says which kernel produced it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from idefics3 import Idefics3, Idefics3Config
from idefics3.device import cpu_description
from idefics3.presets import preset

# Where the benches write their random checkpoints (reused between runs); every script has --dir to change it.
BENCH_DIR = Path(tempfile.gettempdir()) / "idefics3-bench"

# What a forced instruction-set level caps besides our own kernels (IDEFICS3_CPU_ISA, idefics3.device.cpu_isa),
# so that PyTorch's and oneDNN's code paths (ours and transformers') stop at the same level: oneDNN's
# ONEDNN_MAX_CPU_ISA (its dnnl_cpu_isa_t names: SSE41, AVX2, AVX512_CORE, AVX512_CORE_BF16, ...; read at its
# first use) and ATen's ATEN_CPU_CAPABILITY (default, avx2, avx512; read when torch is imported). Both only
# lower what the CPU has. "amx" caps nothing (the highest level idefics3 knows).
ISA_CAPS: dict[str, dict[str, str]] = {
    "amx": {},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "none": {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}


def isa_env(level: str | None) -> dict[str, str]:
    """The environment that makes a child process behave as a CPU stopping at `level` (None: nothing)."""
    if level is None:
        return {}
    from idefics3.device import ENV_ISA

    return {ENV_ISA: level, **ISA_CAPS[level]}


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


def write_random_shards(folder: Path, config: dict, seed: int = 0, max_shard_size: int = 2 * 10**9,
                        dtype: torch.dtype = torch.bfloat16) -> Path:
    """A sharded checkpoint of `config`'s shapes with seeded random weights, written without building the model.

    For models whose fp32 build would not fit in memory (8B: 34 GB): the parameter names and shapes come from
    the model built on the meta device, and each tensor is made only when its shard is written (normal, std
    0.02, for matrices; ones for norm weights; zeros for biases; each tensor seeded from `seed` and its name,
    so the values do not depend on the sharding). Peak memory: about one shard (2.3 GB of RSS for the 8B's
    2 GB shards; written in a minute on one thread). Written as `save_pretrained` writes a sharded checkpoint
    (the keys are the model's parameter names, as both idefics3 and transformers load them):
    model-0000i-of-0000n.safetensors, each under `max_shard_size` bytes unless one tensor is larger,
    model.safetensors.index.json, and config.json (the dict as given) last, so a folder with config.json is
    complete; such a folder is reused as it is.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Idefics3(Idefics3Config.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    nbytes = {k: dtype.itemsize * torch.Size(s).numel() for k, s in shapes.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key in shapes:
        if shards[-1] and size + nbytes[key] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for key in keys:
            t = torch.empty(shapes[key], dtype=dtype)
            if t.dim() >= 2:
                gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
                t.normal_(0.0, 0.02, generator=gen)
            elif key.endswith(".bias"):
                t.zero_()
            else:  # the weight of a LayerNorm / RMSNorm
                t.fill_(1.0)
            tensors[key] = t
        tmp = folder / f".tmp-{name}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the shards of its index, or the single file)."""
    from idefics3.weights import checkpoint_files

    return checkpoint_files(Path(folder))


def read_once(files: list[Path], chunk: int = 64 << 20) -> tuple[int, float]:
    """Read every byte of `files` once (into one reused buffer): (bytes, seconds). Afterwards they are in the
    page cache as far as the RAM allows."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total, t = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - t


def meminfo_bytes(field: str = "MemTotal") -> int:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable, Cached, ...); 0 where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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


def read_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes read per second by a dot product of a buffer of `nbytes` with itself (a read-only stream, as
    decode's weights are; best of `repeats`):
    the bandwidth limit for a working set of that size, caches included, so that a model small enough to sit
    in a large L3 is held to the L3's rate, not DRAM's."""
    buf = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    torch.dot(buf, buf)  # first touch
    best = min(_timed(lambda: torch.dot(buf, buf)) for _ in range(repeats))
    return buf.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_child(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run python code in a fresh process; it prints one JSON line last, which is returned. `env`: variables
    set (over os.environ) for that process only, e.g. `isa_env(level)`."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, **env} if env else None)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(label: str, values: list[float], unit: str) -> str:
    med = statistics.median(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{label:<28} median {med:9.3f} {unit}  (±{spread:.3f}, n={len(values)})"
