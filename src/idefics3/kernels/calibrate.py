"""Choosing each CPU fast path by timing it against the plain one, on this machine, on the model's own shapes.

Which is faster depends on the CPU, not only on its flags: on an AMD EPYC with AVX512-BF16 and no AMX our C++
flash attention beats aten's, while on an Intel Xeon with AMX aten's SDPA (oneDNN brgemm on the tile unit) ran
a 1024-patch SigLIP frame in 6.8 ms per layer against our kernel's 22.3 ms, and a 512-token causal prefill in
1.05 ms against 2.35 ms. So the backend times the candidates (one encoder layer over one frame; its attention;
a 512-token causal prefill with the model's grouped heads) and keeps the faster, with the timings as the stated
reason: by construction no path it installs is slower than the plain one on the machine at hand.

A verdict is remembered per process and in the user's cache folder (`$IDEFICS3_CACHE_DIR`, else
`$XDG_CACHE_HOME/idefics3`, else `~/.cache/idefics3`: calibration.json), keyed by the CPU model, the ISA
level, the torch version, a digest of the kernel sources, the thread count, the op and its shapes: a second load
measures nothing, and another CPU, torch or kernel recalibrates. IDEFICS3_CALIBRATE=0 skips the timing and takes
our kernels wherever they can run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..device import cpu_isa, cpu_model
from ..model.kv_cache import KVCache
from . import cpu_attention, cpu_decode
from .derived import DerivedWeights

log = logging.getLogger(__name__)

ENV_CALIBRATE = "IDEFICS3_CALIBRATE"
ENV_CACHE_DIR = "IDEFICS3_CACHE_DIR"
_REMEMBERED: dict[str, dict] = {}


@dataclass(frozen=True)
class Verdict:
    ours: bool            # take our kernel
    reason: str           # the timings, for Backend.describe()


def calibrating() -> bool:
    return os.environ.get(ENV_CALIBRATE, "1") != "0"


def cache_file() -> Path:
    folder = os.environ.get(ENV_CACHE_DIR)
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "idefics3"
    return Path(folder) / "calibration.json"


@functools.cache
def kernels_version() -> str:
    """A short digest of the kernel sources, so that a changed kernel is measured again."""
    digest = hashlib.blake2b(digest_size=6)
    folder = Path(__file__).parent
    for path in sorted([*folder.glob("*.cpp"), *folder.glob("*.h")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def machine() -> str:
    """What a verdict holds for: this CPU model, the ISA level the kernels may use, the torch version and the
    kernel sources."""
    return f"{cpu_model() or 'unknown CPU'} | {cpu_isa()} | torch {torch.__version__} | kernels {kernels_version()}"


def seconds(*fns: Callable[[], object], repeats: int = 3) -> list[float]:
    """The best of `repeats` timed calls of each function after one warm-up call each, taking turns (A B A B ...)
    so that a burst of load from other processes falls on both."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _load() -> dict[str, dict]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(key: str, verdict: dict) -> None:
    path = cache_file()
    try:
        data = _load()
        data[key] = verdict
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)  # atomic: concurrent processes never read half a file
    except OSError as err:
        log.debug("cannot write %s: %s", path, err)


def _remembered(parts: tuple, fields: set[str], measure: Callable[[], dict]) -> dict:
    """The verdict for `parts` on this machine: from this process, else the cache file (when it has exactly
    `fields`), else `measure()` under inference mode, logged and stored."""
    key = json.dumps([machine(), torch.get_num_threads(), *map(str, parts)])
    if key in _REMEMBERED:
        return _REMEMBERED[key]
    cached = _load().get(key)
    if isinstance(cached, dict) and set(cached) == fields:
        verdict = cached
    else:
        with torch.inference_mode():
            verdict = measure()
        log.info("calibrated %s", verdict["reason"])
        _store(key, verdict)
    _REMEMBERED[key] = verdict
    return verdict


def compare(parts: tuple, ours: Callable[[], object], plain: Callable[[], object], what: str,
            plain_name: str = "SDPA") -> Verdict:
    """Time `ours` against `plain` (once per machine, op and shape: remembered and cached on disk)."""
    def measure() -> dict:
        if ours() is None:  # the kernel declined these inputs
            return asdict(Verdict(False, f"our kernel declines {what}"))
        t_ours, t_plain = seconds(ours, plain)
        faster = "ours" if t_ours <= t_plain else plain_name
        return asdict(Verdict(t_ours <= t_plain, f"measured on {what}: ours {t_ours * 1e3:.2f} ms, {plain_name} "
                                                 f"{t_plain * 1e3:.2f} ms, {faster} faster"))
    verdict = _remembered(parts, {"ours", "reason"}, measure)
    return Verdict(bool(verdict["ours"]), str(verdict["reason"]))


def fastest(parts: tuple, candidates: dict[str, Callable[[], object]], what: str) -> tuple[str, str]:
    """The fastest of several ways to compute the same thing (name, reason with every timing), measured once per
    machine, op and shape like `compare`."""
    def measure() -> dict:
        times = dict(zip(candidates, seconds(*candidates.values()), strict=True))
        best = min(times, key=times.__getitem__)
        timings = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in times.items())
        return {"choice": best, "reason": f"measured on {what}: {timings}, {best} fastest"}
    verdict = _remembered((*parts, *candidates), {"choice", "reason"}, measure)  # other candidates: another key
    return str(verdict["choice"]), str(verdict["reason"])


def vision_attention(heads: int, patches: int, head_dim: int, dtype: torch.dtype) -> Verdict:
    """Our kernel or SDPA for the encoder's bidirectional attention over one frame."""
    if not calibrating():
        return Verdict(True, f"{ENV_CALIBRATE}=0: not measured")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, patches, head_dim, generator=gen).to(dtype) for _ in range(3))
    return compare(("vision attention", heads, patches, head_dim, dtype),
                   lambda: cpu_attention.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v),
                   f"one frame ({patches} patches)")


def prefill_attention(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 512) -> Verdict:
    """Our kernel or SDPA for the decoder's causal prefill attention (grouped heads)."""
    if not calibrating():
        return Verdict(True, f"{ENV_CALIBRATE}=0: not measured")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(dtype) for _ in range(2))
    return compare(("prefill attention", heads, kv_heads, head_dim, tokens, dtype),
                   lambda: cpu_attention.text_attention(q, k, v, None, True),
                   lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads),
                   f"a {tokens}-token causal prefill")


def vision_layer(plain: nn.Module, fused: nn.Module, patches: int, hidden: int, dtype: torch.dtype) -> Verdict:
    """The fused encoder layer (oneDNN epilogues) or the plain one, timed on one frame's patches."""
    if not calibrating():
        return Verdict(True, f"{ENV_CALIBRATE}=0: not measured")
    x = torch.randn(1, patches, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    return compare(("vision layer", patches, hidden, dtype), lambda: fused(x, None), lambda: plain(x, None),
                   f"one encoder layer over one frame ({patches} patches)", plain_name="plain")


@dataclass(frozen=True)
class DecodePlan:
    """How decode steps run: on the fused kernel or the plain forward, and from how many rows on AMX tiles."""

    kernel: bool
    amx_rows: int  # 0: never
    reason: str


class _DecodeTrial:
    """Decode steps of one model on a small cache of its own (the real weights; positions 32..): the plain forward,
    the fused kernel on AVX-512, and on AMX tiles. Decoders are built on first use."""

    POSITION = 32

    def __init__(self, model: nn.Module, derived: DerivedWeights, variant: str) -> None:
        self.model, self.derived, self.variant = model, derived, variant
        self.cache: KVCache = model.make_cache(8, self.POSITION + 8)
        self._decoders: dict[bool, cpu_decode.CpuDecoder] = {}

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(1, rows + 1)[:, None]  # [R, 1]
        return ids, torch.full((rows, 1), self.POSITION)

    def plain(self, rows: int) -> object:
        ids, pos = self._inputs(rows)
        return self.model(ids, position_ids=pos, kv_cache=self.cache, cache_slots=torch.arange(rows),
                          logits_to_keep=1, kv_len=self.POSITION + 1).logits

    def kernel(self, rows: int, amx: bool = False) -> object:
        if amx not in self._decoders:
            parts = cpu_decode.DecoderParts.of(self.model)
            decoder = cpu_decode.CpuDecoder(parts, self.cache, cpu_decode.load_library(self.variant), self.derived,
                                            self.variant)
            if amx:
                decoder.use_amx(1)
            self._decoders[amx] = decoder
        ids, pos = self._inputs(rows)
        return self._decoders[amx](ids, pos, None, self.POSITION + 1)


def decode(model: nn.Module, derived: DerivedWeights, variant: str, amx: bool) -> DecodePlan:
    """The fused decode kernel or the plain forward (one row), and, where AMX tiles can run (`amx`), whether
    they beat AVX-512 at 8 rows (against its packed copies where it makes them) and at 1 row. The packed copies
    made for the comparison are freed again where AMX wins (it needs none)."""
    if not calibrating():
        return DecodePlan(True, 2 if amx else 0, f"{ENV_CALIBRATE}=0: not measured")
    t = model.config.text_config
    formats = cpu_decode.DecoderParts.of(model).formats()  # "dense", or the quantised formats: timed apart
    shape = (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
             t.num_key_value_heads, t.head_dim, t.vocab_size, model.model.text_model.norm.weight.dtype, variant,
             formats)
    trial = _DecodeTrial(model, derived, variant)
    one = compare(("decode", *shape), lambda: trial.kernel(1), lambda: trial.plain(1),
                  "one decode step of 1 row", plain_name="plain")
    if not one.ours:
        return DecodePlan(False, 0, one.reason)
    if not amx:
        return DecodePlan(True, 0, one.reason)
    eight = compare(("decode 8 rows, AMX", *shape), lambda: trial.kernel(8, amx=True), lambda: trial.kernel(8),
                    "a decode step of 8 rows", plain_name="AVX-512")
    reason = f"{one.reason}; AMX tiles {eight.reason}"
    if not eight.ours:
        return DecodePlan(True, 0, reason)
    derived.drop(model.model.text_model, "packed_decode")
    single = compare(("decode 1 row, AMX", *shape), lambda: trial.kernel(1, amx=True), lambda: trial.kernel(1),
                     "a decode step of 1 row", plain_name="AVX-512")
    return DecodePlan(True, 1 if single.ours else 2, f"{reason}; {single.reason}")
