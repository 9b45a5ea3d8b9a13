"""The `idefics3 eval` command: its flags (kept free of heavy imports, so `idefics3 --help` stays fast) and the
thin layer that turns them into a run and prints the table.

`add_eval_parser(sub, parents, extra_tasks, legacy)` is called with the CLI's subparsers; `extra_tasks` maps a
task name to a factory taking the parsed arguments (the demo's `shapes`, built from --seed / --count), and
`legacy` names the task run when --task is not given, printed the way that task's own command always printed
it (the demo's `idefics3 eval`: per-type accuracy, no files unless --output). The library logs or raises; this
module prints: the progress bar and warnings on stderr, the results table on stdout.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from ..dtypes import SHORT_NAMES

DEFAULT_OUTPUT = "idefics3-eval"
DEFAULT_BATCH = 16  # AMX tiles take 16 rows: a 16-row decode step costs ~1.2x an 8-row one (bench/eval.py)
STYLES = ("lmms-eval", "vlmevalkit")
DTYPES = (*SHORT_NAMES, "auto")
TaskFactory = Callable[[argparse.Namespace], Any]


def add_eval_parser(sub: Any, parents: list[argparse.ArgumentParser],
                    extra_tasks: Mapping[str, TaskFactory] | None = None, legacy: str | None = None,
                    help: str | None = None) -> argparse.ArgumentParser:
    from .benchmarks import TASKS  # the task classes only: no torch

    names = [*TASKS, *(extra_tasks or {})]
    p = sub.add_parser("eval", parents=parents, help=help or "benchmarks with their official metrics",
                       description="Evaluate on public benchmarks (parquet files as published on the Hub, from a "
                                   "folder or the Hugging Face cache) with the official metrics; the engine answers "
                                   "many questions at once. Writes a results JSON and one JSON line per sample.")
    p.add_argument("--task", metavar="NAMES", help=f"comma-separated: {', '.join(names)}"
                   + (f" (default: {legacy}, printed as that check always was)" if legacy else ""))
    where = p.add_argument_group("data")
    where.add_argument("--data", metavar="FOLDER", help="the folder of one task's parquet files (a Hub snapshot)")
    where.add_argument("--data-root", metavar="ROOT", help="a folder holding one folder per task (DocVQA, textvqa, "
                       "MMMU, ...); default: the Hugging Face cache, offline")
    where.add_argument("--split", help="default: each task's scored split (validation, testmini, val or test)")
    where.add_argument("--limit", type=int, metavar="N", help="the first N samples of each task")
    run = p.add_argument_group("running")
    run.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N",
                     help=f"sequences in flight (default {DEFAULT_BATCH}; with --server: concurrent requests)")
    run.add_argument("--max-new-tokens", type=int, metavar="N", help="override each task's answer length")
    run.add_argument("--dtype", choices=DTYPES, help="weights dtype (default as `idefics3 generate`)")
    run.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available; under torchrun "
                                      "cuda:LOCAL_RANK)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    run.add_argument("--quantize", metavar="FORMAT", help="quantise while loading: int8, int4, int4-g64, ...")
    run.add_argument("--server", metavar="URL", help="ask an OpenAI-compatible server (.../v1) instead of a local "
                                                     "model")
    run.add_argument("--api-key", metavar="KEY", help="the server's key (default $OPENAI_API_KEY)")
    run.add_argument("--server-model", metavar="NAME", help="the model name to send (default: the server's first)")
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt-style", choices=STYLES, default="lmms-eval",
                         help="as lmms-eval (default) or VLMEvalKit write them for Idefics3 / SmolVLM")
    prompts.add_argument("--prompt", action="append", metavar="[TASK.]KEY=VALUE",
                         help="override a prompt piece: pre, post, mc_post, open_post, prefix (repeatable)")
    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", metavar="FOLDER", help=f"where results go (default ./{DEFAULT_OUTPUT}"
                     + ("; none for the default check" if legacy else "") + ")")
    out.add_argument("--resume", action="store_true", help="skip the samples the output folder already has")
    out.add_argument("--overwrite", action="store_true", help="discard earlier records of the same task and split")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    out.add_argument("--show-errors", action="store_true", help="print every wrong answer")
    if extra_tasks:
        demo = p.add_argument_group("added tasks (shapes: the built-in model's held-out check)")
        demo.add_argument("--seed", type=int, help="question seed (default 1000; the built-in model trained on 0)")
        demo.add_argument("--count", type=int, help="questions (default 200)")
    p.set_defaults(run=lambda args: run_eval(args, extra_tasks or {}, legacy))
    return p


def _check(args: argparse.Namespace, names: list[str]) -> None:
    for flag in ("limit", "batch", "max_new_tokens", "threads", "count"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.data and len(names) > 1:
        raise ValueError("--data names one task's folder; for several tasks use --data-root")
    if args.data and args.data_root:
        raise ValueError("give --data or --data-root, not both")
    if args.resume and args.overwrite:
        raise ValueError("give --resume or --overwrite, not both")


def run_eval(args: argparse.Namespace, extra_tasks: Mapping[str, TaskFactory], legacy: str | None) -> int:
    from pathlib import Path

    from .benchmarks import get_tasks

    is_legacy = args.task is None
    if is_legacy and legacy is None:
        raise ValueError("--task is required (e.g. --task docvqa)")
    names = [n.strip().lower() for n in (args.task or legacy).split(",") if n.strip()]
    _check(args, names)
    extra = {n: factory(args) for n, factory in extra_tasks.items() if n in names}
    tasks = get_tasks(",".join(names), extra)
    output = Path(args.output) if args.output else (None if is_legacy else Path(DEFAULT_OUTPUT))
    if args.resume and output is None:
        raise ValueError("--resume needs --output (the folder of the earlier run)")

    from .distributed import join, leave
    from .harness import Settings, evaluate
    from .prompts import parse_overrides

    world = join()
    try:
        settings = Settings(args.data, args.data_root, args.split, args.limit, output, args.resume, args.overwrite,
                            args.prompt_style, parse_overrides(args.prompt, names), args.max_new_tokens,
                            args.progress)
        opener, run = _backend(args, settings, world)
        if world.is_main:
            print(f"model: {run['model']['path'] or run['model']['server']}")
            if is_legacy:
                for task in tasks:
                    print(getattr(task, "heading", task.title))
        results = evaluate(tasks, settings, opener, run, world)
    finally:
        leave(world)
    if not world.is_main:
        return 0
    _print(results, args, is_legacy, output)
    return 0


def _backend(args: argparse.Namespace, settings: Any, world: Any) -> tuple[Callable[[], Any], dict[str, Any]]:
    """(a function opening the backend, the run description for the results JSON)."""
    import datetime
    import os

    from .. import __version__
    from .prompts import prompt_version
    from .results import git_commit

    run: dict[str, Any] = {
        "model": {"path": None, "server": args.server, "dtype": args.dtype, "device": args.device,
                  "quantization": args.quantize, "backend": "server" if args.server else "engine"},
        "prompt": {"style": settings.style, "version": prompt_version(settings.style, settings.overrides)},
        "generation": {"greedy": True, "batch": args.batch, "longest_edge": args.longest_edge,
                       "image_splitting": not args.no_split, "limit": args.limit},
        "idefics3": {"version": __version__, "commit": git_commit()},
        "time": {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "world_size": world.size,
    }
    if args.server:
        from .client import ServerBackend

        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        return lambda: ServerBackend(args.server, args.batch, key, args.server_model), run

    from ..loading import resolve_model

    folder = resolve_model(args.model)  # a missing model fails before any data is read
    run["model"]["path"] = str(folder)

    def open_local() -> Any:
        import torch

        from ..loading import load_model, load_processor
        from .runner import EngineBackend

        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device is None and world.size > 1 and torch.cuda.is_available():
            device = f"cuda:{world.local_rank}"
        processor = load_processor(folder, longest_edge=args.longest_edge, split=not args.no_split)
        model = load_model(folder, dtype=args.dtype, device=device, quantize=args.quantize)
        quant = getattr(model, "quantization", None)
        run["model"].update(dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
                            quantization=quant.summary() if quant is not None else None)
        return EngineBackend(model, processor, batch=args.batch)

    return open_local, run


def _print(results: list[Any], args: argparse.Namespace, is_legacy: bool, output: Any) -> None:
    from .results import breakdown_lines, table

    if args.show_errors:
        for r in results:
            for rec in r.records:
                if rec.get("error") or (rec.get("score") is not None and rec["score"] < 1):
                    what = rec["error"] or f"expected {rec['references']!r}, got {rec['answer']!r}"
                    print(f"  [{r.task.name} {rec['id']}] {what}")
    if is_legacy:
        for r in results:
            for line in breakdown_lines(r):
                print(line)
        return
    for line in table(results):
        print(line)
    for r in results:
        for line in breakdown_lines(r):
            print(line)
    if output is not None:
        print(f"results: {output}/ (<task>-<split>.json, per-sample <task>-<split>.jsonl)")
