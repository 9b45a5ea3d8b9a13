"""`idefics3 demo`: the packaged tiny model answering questions about pictures it has never seen.

    idefics3 demo [--model M] [--out idefics3-demo] [--seed 7]

It writes one example scene per question type (two for the two-image question) into --out, asks the model,
and prints each question, the answer, the expected answer and the time it took. With --model it runs the
same questions on any checkpoint (a general model answers in its own words, so "expected" may not match).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from ..loading import load_model, load_processor, resolve_model
from .evaluate import answer, normalise
from .questions import KINDS, make_example


def run_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    processor = load_processor(folder, longest_edge=args.longest_edge, split=not args.no_split)
    model = load_model(folder, device=args.device)
    print(f"model: {folder} (loaded in {time.perf_counter() - start:.1f}s)")
    rng = random.Random(args.seed)
    right = 0
    for kind in KINDS:
        ex = make_example(rng, kind)
        paths = []
        for i, image in enumerate(ex.images):
            path = out / f"{kind}{'-' + str(i + 1) if len(ex.images) > 1 else ''}.png"
            image.save(path)
            paths.append(str(path))
        t0 = time.perf_counter()
        got = answer(model, processor, ex.images, ex.question)
        ms = 1000 * (time.perf_counter() - t0)
        ok = normalise(got) == normalise(ex.answer)
        right += ok
        print(f"\n{' + '.join(paths)}\n  Q: {ex.question}\n  A: {got}   ({ms:.0f} ms; expected {ex.answer}"
              f"{'' if ok else ' - wrong'})")
    print(f"\n{right}/{len(KINDS)} correct. Try your own: idefics3 generate --image {paths[0]} "
          f"\"How many shapes are there?\"")
    return 0
