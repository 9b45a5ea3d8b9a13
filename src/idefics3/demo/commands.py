"""The `demo` and `eval` subcommands' parsers, kept free of heavy imports so that `idefics3 --help` stays fast.

`add_demo_parser` / `add_eval_parser` take the CLI's subparsers object and its shared parent parsers (for
--model, --longest-edge, --no-split, --debug); each parser's `run(args)` imports the real work lazily.
"""

from __future__ import annotations

import argparse
from typing import Any

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
    p = sub.add_parser("eval", parents=parents, help="accuracy per question type on held-out demo-task questions",
                       description="Ask COUNT held-out questions of the demo task (scenes of shapes and words, "
                                   "drawn from SEED) and print exact-match accuracy per question type.")
    p.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"question seed (default {EVAL_SEED}; the built-in model was trained on seed 0)")
    p.add_argument("--count", type=int, default=EVAL_COUNT, help=f"questions (default {EVAL_COUNT})")
    p.add_argument("--show-errors", action="store_true", help="print every wrong answer")
    _device(p)
    p.set_defaults(run=_run_eval)
    return p


def _run_demo(args: argparse.Namespace) -> int:
    from .showcase import run_demo

    return run_demo(args)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    return run_eval(args)
