"""Decode-step speed of the fused CPU kernel on dense bf16, int8 and int4 weights of SmolVLM-256M's text shapes.

Workload: the text decoder of SmolVLM-256M (hidden 576, MLP 1536, 30 layers, 9 heads / 3 kv heads of 64, vocab
49280, tied embeddings) with seeded random weights (normal, std 0.02) in the model dtype, quantised by the
package's policy (quant/apply.py `plan`: decoder linears in the asked format, embeddings and the tied head int8
in groups of 32); a cache holding --position random keys and values per row; then --steps decode steps of one
token per row through the fused kernel (`CpuDecoder`), timed one by one, each format taking turns A B C A B C
(these machines are shared: only ratios measured together are trusted); each turn starts with --warmup untimed
steps, so that a format is timed as it runs alone and not while refilling the caches the other formats' turns
evicted (this CPU's L3 holds most of an int4 model, little of a bf16 one). No checkpoint is written, the vision
tower is never run.

Printed: the CPU and its ISA, the copy bandwidth; per format and batch: median ms per step (and the best), tokens/s,
weight MB read per token (every decoder matrix and the head, with scales and mins; the embedding: one row), their
GB/s at the median and that as a fraction of the copy bandwidth (read + write, measured on the spot), and the
speed-up over the first format. A format ending in "/fp32" runs its quantised products on fp32 inputs (the exact
path) instead of int8 ones where the CPU has VNNI (cpu_decode.quant_inputs), e.g. --formats dense,int4,int4/fp32.
IDEFICS3_CPU_ISA=avx2 measures the AVX2 build. Usage:

    python bench/quant_decode_micro.py [--formats dense,int8,int4] [--batches 1,8] [--rounds 5] [--steps 16]
                                       [--warmup 4] [--position 64] [--dtype bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import copy_bandwidth, machine_line  # noqa: E402
from idefics3 import Idefics3Config, Idefics3ForConditionalGeneration  # noqa: E402
from idefics3.kernels import cpu_decode  # noqa: E402
from idefics3.kernels.derived import DerivedWeights  # noqa: E402
from idefics3.presets import preset  # noqa: E402
from idefics3.quant import QuantLinear  # noqa: E402
from idefics3.quant.apply import parse_quantize, plan, quantize_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dense_model(dtype: torch.dtype) -> Idefics3ForConditionalGeneration:
    """SmolVLM-256M's shapes, seeded random weights (the vision tower is built and never run)."""
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(preset("SmolVLM-256M-Instruct")))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def formatted(dense: Idefics3ForConditionalGeneration, fmt: str) -> Idefics3ForConditionalGeneration:
    """The dense model itself, or a quantised copy in `fmt` (a quantize= name: "int8", "int4", "int4-g128",
    "int4-asym", ...) by the package's policy."""
    if fmt == "dense":
        return dense
    model = copy.deepcopy(dense)
    spec = parse_quantize(fmt.removesuffix("/fp32"))
    quantize_model(model, plan(model, spec.bits, spec.group_size, asymmetric=spec.asymmetric))
    return model


def weight_bytes(model: Idefics3ForConditionalGeneration) -> int:
    """Bytes of weights (with scales and mins) one decode step reads: the decoder's matrices and the head."""
    parts = cpu_decode.DecoderParts.of(model)
    total = 0
    for _, module in cpu_decode._linears(parts):
        if isinstance(module, QuantLinear):
            total += module.weight_nbytes()
        else:
            total += module.weight.numel() * module.weight.element_size()
    return total


class Stepper:
    """One model's fused decoder over a cache of `batch` rows filled with random keys up to `position`."""

    def __init__(self, model: Idefics3ForConditionalGeneration, batch: int, position: int,
                 inputs: str | None) -> None:
        parts = cpu_decode.DecoderParts.of(model)
        reason = cpu_decode.unsupported_reason(parts)
        if reason is not None:
            raise SystemExit(f"the fused decode kernel does not run this model here: {reason}")
        self.cache = model.make_cache(batch, position + 64)
        gen = torch.Generator().manual_seed(1)
        for buf in (*self.cache.k, *self.cache.v):
            buf.copy_(torch.randn(buf.shape, generator=gen))
        variant = cpu_decode.variant_for(parts.dtype)
        self.decoder = cpu_decode.CpuDecoder(parts, self.cache, cpu_decode.load_library(variant), DerivedWeights(),
                                             variant, inputs)
        self.tokens = torch.arange(5, 5 + batch)[:, None]
        self.pos = torch.full((batch, 1), position)
        self.start = position

    def step(self) -> None:
        logits = self.decoder(self.tokens, self.pos, None, int(self.pos[0, 0]) + 1)
        self.tokens = logits[:, -1].argmax(-1)[:, None]
        self.pos = self.pos + 1
        if int(self.pos[0, 0]) >= self.start + 60:
            self.pos = torch.full_like(self.pos, self.start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="dense,int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps at the start of each turn")
    ap.add_argument("--position", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    dense = dense_model(DTYPES[args.dtype])
    models = {fmt: formatted(dense, fmt) for fmt in formats}
    sizes = {fmt: weight_bytes(m) for fmt, m in models.items()}
    bandwidth = copy_bandwidth()
    print(machine_line(args.threads))
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); model dtype {args.dtype}")
    with torch.inference_mode():
        for batch in map(int, args.batches.split(",")):
            steppers = {fmt: Stepper(m, batch, args.position, "fp32" if fmt.endswith("/fp32") else None)
                        for fmt, m in models.items()}
            times: dict[str, list[float]] = {fmt: [] for fmt in formats}
            for s in steppers.values():  # warm-up
                s.step()
            for _ in range(args.rounds):
                for fmt, s in steppers.items():
                    for _ in range(args.warmup):
                        s.step()
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        s.step()
                        times[fmt].append(time.perf_counter() - t)
            base = statistics.median(times[formats[0]])
            print(f"batch {batch} ({steppers[formats[0]].decoder.variant} build):")
            for fmt in formats:
                inputs = steppers[fmt].decoder.inputs if steppers[fmt].decoder.quantised else "-"
                med, best = statistics.median(times[fmt]), min(times[fmt])
                gbs = sizes[fmt] / med / 1e9
                print(f"  {fmt:<10} {inputs:>4} inputs {med * 1e3:7.2f} ms/step (best {best * 1e3:6.2f}) "
                      f"{batch / med:7.1f} tok/s  "
                      f"{sizes[fmt] / 1e6:6.1f} MB/token {gbs:5.1f} GB/s ({gbs * 1e9 / bandwidth:4.0%} of copy bw)  "
                      f"x{base / med:.2f} vs {formats[0]}")

if __name__ == "__main__":
    main()
