"""Decode step speed on the CPU: plain PyTorch path vs the fused kernel vs transformers, alternating.

Workload: a SmolVLM-256M-shaped checkpoint (seeded random bf16 weights, see common.py), a text prompt of
--prompt tokens prefilled once per round, then --steps greedy decode steps timed one by one, for
batch 1 and batch 8. "plain" is the model loaded with backend="torch" (every step through the model's
forward), "kernel" the same checkpoint loaded with backend="auto", whose steps go through
`model.backend.decoder_for(model, cache)` (the fused C++ decode step). The three implementations live in one
process and take turns A B C A B C (these machines are shared: only ratios measured together are trusted).
Each step includes the argmax of the logits. Printed: the CPU and its ISA, each backend's `describe()` (which
implementation ran each op, and the derived weights' memory: the packed copies batch 8 decodes on), then per
implementation and batch: median ms per step, tokens/s, weight GB/s (decode_bytes_per_token per step / step
time) and the fraction of the copy-bandwidth limit (copy bandwidth measured on the spot / bytes per token). Usage:

    python bench/decode_kernel.py [--rounds 5] [--steps 32] [--prompt 64] [--threads 2] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import idefics3  # noqa: E402
from common import (  # noqa: E402
    BENCH_DIR,
    backend_lines,
    copy_bandwidth,
    decode_bytes_per_token,
    machine_line,
    write_random_checkpoint,
)


class Ours:
    """Our model on a KVCache, decoding through its backend's fused decoder where it gives one (backend "auto"),
    else through the plain forward (backend "torch")."""

    def __init__(self, model: idefics3.Idefics3ForConditionalGeneration, batch: int, max_seq: int,
                 fused: bool) -> None:
        self.model, self.batch = model, batch
        self.cache = model.make_cache(batch, max_seq)
        self.decoder = model.backend.decoder_for(model, self.cache)
        if fused and self.decoder is None:
            raise SystemExit("the fused decode kernel is not available here:\n" +
                             "\n".join(backend_lines(model.backend)))
        if not fused and self.decoder is not None:
            raise SystemExit("the plain model's backend gave a fused decoder")
        self.slots = torch.arange(batch - 1, -1, -1)  # reversed: the gather path, as in a busy engine

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        pos = torch.arange(t).expand(b, t)
        out = self.model(ids, position_ids=pos, kv_cache=self.cache, cache_slots=self.slots, logits_to_keep=1,
                         kv_len=t)
        self.pos = torch.full((b, 1), t)
        return out.logits[:, -1].argmax(-1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        kv_len = int(self.pos[0, 0]) + 1
        if self.decoder is not None:
            logits = self.decoder(tokens[:, None], self.pos, self.slots, kv_len)
        else:
            logits = self.model(tokens[:, None], position_ids=self.pos, kv_cache=self.cache, cache_slots=self.slots,
                                logits_to_keep=1, kv_len=kv_len).logits
        self.pos = self.pos + 1
        return logits[:, -1].argmax(-1)


class Transformers:
    """transformers' Idefics3 (sdpa) on its own DynamicCache, one forward per decode step."""

    def __init__(self, folder: Path) -> None:
        from transformers import Idefics3ForConditionalGeneration as HF

        self.model = HF.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").eval()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1)


def time_steps(impl, ids: torch.Tensor, steps: int) -> list[float]:
    tokens = impl.prefill(ids)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tokens = impl.step(tokens)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dir", default=str(BENCH_DIR / "speed-smolvlm-256m"))
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = write_random_checkpoint(Path(args.dir), "SmolVLM-256M-Instruct", dtype=torch.bfloat16)
    models = {name: idefics3.load_model(folder, dtype="bf16", device="cpu", backend=backend)
              for name, backend in (("plain", "torch"), ("kernel", "auto"))}  # same checkpoint, two backends
    per_token = decode_bytes_per_token(models["kernel"].config)
    max_seq = args.prompt + args.steps + 1
    with torch.inference_mode():
        impls = {}
        for b in args.batches:
            impls[("plain", b)] = Ours(models["plain"], b, max_seq, fused=False)
            impls[("kernel", b)] = Ours(models["kernel"], b, max_seq, fused=True)
            if not args.skip_transformers:
                impls[("transformers", b)] = None
        hf = None if args.skip_transformers else Transformers(folder)
        gen = torch.Generator().manual_seed(0)
        ids = {b: torch.randint(3, 49000, (b, args.prompt), generator=gen) for b in args.batches}
        for impl in impls.values():  # warm-up: thread pools, lazy tables, the kernel build
            time_steps(impl or hf, ids[args.batches[0]][:1] if impl is None else ids[impl.batch], 2)
        times = {k: [] for k in impls}
        bandwidth = []
        for r in range(args.rounds):
            bandwidth.append(copy_bandwidth(nbytes=1 << 28))
            for (name, b), impl in impls.items():
                times[(name, b)] += time_steps(impl or hf, ids[b], args.steps)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    bw = statistics.median(bandwidth)
    limit_ms = per_token / bw * 1e3
    print(f"\n{machine_line(args.threads)}")
    for name, model in models.items():
        print("\n".join(backend_lines(model.backend, f"kernels of the {name!r} model")))
    print(f"{args.threads} threads, copy bandwidth {bw / 1e9:.1f} GB/s (read+write), {per_token / 1e6:.0f} MB of "
          f"weights per step -> bandwidth limit {limit_ms:.1f} ms/step")
    print(f"{'impl':<14}{'batch':>6}{'ms/step':>10}{'(p10-p90)':>16}{'tok/s':>9}{'GB/s':>7}{'of limit':>10}")
    ms = {}
    for (name, b), ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        ms[(name, b)] = med * 1e3
        lo, hi = ts[len(ts) // 10] * 1e3, ts[len(ts) * 9 // 10] * 1e3
        print(f"{name:<14}{b:>6}{med * 1e3:>10.2f}{f'({lo:.1f}-{hi:.1f})':>16}{b / med:>9.1f}"
              f"{per_token / med / 1e9:>7.1f}{limit_ms / (med * 1e3):>10.0%}")
    for b in args.batches:
        line = f"batch {b}: kernel {ms[('plain', b)] / ms[('kernel', b)]:.2f}x plain"
        if not args.skip_transformers:
            line += f", {ms[('transformers', b)] / ms[('kernel', b)]:.2f}x transformers"
        print(line)
    if 1 in args.batches and 8 in args.batches:
        print(f"kernel batch 8 / batch 1 tokens/s: {8 * ms[('kernel', 1)] / ms[('kernel', 8)]:.1f}x")


if __name__ == "__main__":
    main()
