"""The `demo` and `eval` subcommands' parsers, kept free of heavy imports so that `idefics3 --help` stays fast.

`add_demo_parser` / `add_eval_parser` take the CLI's subparsers object and its shared parent parsers (for
--model, --longest-edge, --no-split, --debug); each parser's `run(args)` imports the real work lazily. `idefics3
eval` is the evaluation harness's command (idefics3.eval.cli) with the demo's held-out check added as the task
`shapes`: run when no --task is given, and printed as it always was (accuracy per question type).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..eval.cli import add_eval_parser as add_harness_parser

DEMO_SEED = 7
DEMO_OUT = "idefics3-demo"
EVAL_SEED = 1000  # the packaged model was trained on seed 0
EVAL_COUNT = 200


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (1 is fastest for the small built-in model)")


def add_demo_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", parents=parents, help="show the model (default: the built-in one) answering questions",
                       description="Write a few example images, ask the model about them, print each answer "
                                   "with the time it took.")
    p.add_argument("--out", default=DEMO_OUT, metavar="FOLDER",
                   help=f"where the example images go (default ./{DEMO_OUT})")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="which example scenes")
    _device(p)
    p.set_defaults(run=_run_demo)
    return p


def add_eval_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`idefics3 eval`: the benchmarks, plus `shapes` (the built-in model's held-out check, the default)."""
    return add_harness_parser(sub, parents, extra_tasks={"shapes": _shapes_task}, legacy="shapes",
                              help="benchmarks with their official metrics (default: the demo's held-out check)")


def _shapes_task(args: argparse.Namespace) -> Any:
    from .evaluate import ShapesTask

    seed = EVAL_SEED if args.seed is None else args.seed
    count = EVAL_COUNT if args.count is None else args.count
    return ShapesTask(seed, count)


def _run_demo(args: argparse.Namespace) -> int:
    from .showcase import run_demo

    return run_demo(args)
