"""Demo evaluation latency: `idefics3 eval` on the built-in model, timed per question.

This is the timing that tests/demo/test_accuracy.py used to assert (200 held-out questions in under two minutes
on CPU); the test now checks accuracy only, since wall-clock time depends on the machine and its load. The model
and processor are loaded as the `idefics3 eval` command loads them (`idefics3.resolve_model` / `load_processor`
/ `load_model`: the default dtype and the "auto" kernel backend, one torch thread unless --threads says
otherwise), then the held-out questions (seed 1000, 200 by default) are asked --rounds times after a short
warm-up, each one answered by `idefics3.ask` (demo/evaluate.py). Prints the CPU model, its ISA and the thread
count, which implementation ran each op (`model.backend.describe()`), the load time, each round's total, then
medians: per-question latency overall and per question type, and the whole evaluation against the old two-minute
budget. Accuracy is printed for reference only (the test asserts it).

    python bench/demo_eval.py [--rounds 3] [--count 200] [--seed 1000] [--threads 1] [--model M] [--device D]
                              [--backend auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import idefics3  # noqa: E402
from common import backend_lines, machine_line, summary  # noqa: E402
from idefics3.demo.commands import EVAL_COUNT, EVAL_SEED  # noqa: E402
from idefics3.demo.evaluate import evaluate  # noqa: E402

BUDGET_S = 120.0  # the old test's limit for 200 questions, load included


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=EVAL_COUNT)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--threads", type=int, default=1, help="torch threads, as `idefics3 eval --threads` (default 1)")
    p.add_argument("--model", help="checkpoint (default: the built-in demo model)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--backend", choices=["auto", "torch"], default="auto",
                   help="kernel backend (default auto, as `idefics3 eval`; torch: the plain path)")
    args = p.parse_args()
    if args.threads <= 0 or args.count <= 0 or args.rounds <= 0:
        p.error("--threads, --count and --rounds must be positive")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()  # as `idefics3 eval` loads (demo/evaluate.py, run_eval)
    folder = idefics3.resolve_model(args.model)
    processor = idefics3.load_processor(folder)
    model = idefics3.load_model(folder, device=args.device, backend=args.backend)
    load_s = time.perf_counter() - start
    print(f"{machine_line()}; {os.cpu_count()} logical cores")
    print("\n".join(backend_lines(model.backend)))
    print(f"model: {folder} ({model.dtype}, {model.device}); load {load_s:.2f} s")
    print(f"questions: {args.count} from seed {args.seed}, {args.rounds} round(s)")

    evaluate(model, processor, args.seed, min(args.count, 10))  # warm-up: first-call costs, allocator
    per_question: list[float] = []
    per_kind: dict[str, list[float]] = {}
    totals: list[float] = []
    for i in range(args.rounds):
        start = time.perf_counter()
        report = evaluate(model, processor, args.seed, args.count)
        totals.append(time.perf_counter() - start)
        for r in report.records:
            per_question.append(1000 * r.seconds)
            per_kind.setdefault(r.kind, []).append(1000 * r.seconds)
        print(f"round {i + 1}: {totals[-1]:.2f} s, accuracy {100 * report.accuracy():.1f}%")

    print(summary("per question", per_question, "ms"))
    for kind, values in per_kind.items():
        print(summary(f"  {kind}", values, "ms"))
    print(summary(f"whole eval ({args.count} questions)", totals, "s"))
    scaled = load_s + statistics.median(totals) * 200 / args.count
    print(f"load + median eval, scaled to 200 questions: {scaled:.1f} s against the old budget of "
          f"{BUDGET_S:.0f} s ({'within' if scaled < BUDGET_S else 'OVER'})")


if __name__ == "__main__":
    main()
