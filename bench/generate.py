"""Time to first token (TTFT) and decode speed of `generate`: idefics3 against transformers, same checkpoint.

Both models are loaded once, in this process, from the same folder (by default a seeded random checkpoint
of SmolVLM-256M's exact shapes, with the SmolVLM processor files), get the same processor inputs, and run
alternately A B A B after one warm-up each. Ours is loaded with `idefics3.load_model` (--backend: "auto", our
CPU kernels where they run, or "torch", the plain path) and its processor with `idefics3.load_processor`. Both
are forced to produce exactly --new-tokens tokens (min_new_tokens), greedy. On a shared CPU pass --threads 1:
OpenMP threads that wait for each other under contention distort both sides. TTFT is measured from the
generate call to the first new token (image encoding and prefill included); decode speed from the first to the
last new token (so this calls generate with a per-token callback, not `idefics3.ask`). Also printed: the CPU and
its ISA, and which implementation ran each op (`model.backend.describe()`). Usage:

    python bench/generate.py [--model DIR] [--preset SmolVLM-256M-Instruct] [--images 1] [--longest-edge PX]
                             [--no-split] [--new-tokens 32] [--batch 1] [--repeats 5] [--device cpu] [--dtype fp32]
                             [--backend auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import idefics3  # noqa: E402
from common import BENCH_DIR, backend_lines, machine_line, write_random_checkpoint  # noqa: E402
from idefics3.dtypes import SHORT_NAMES, to_torch_dtype  # noqa: E402


class _Clock:
    """A transformers streamer that only notes when each put arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def prepare(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    folder = Path(args.dir) / args.preset
    if args.preset == "tiny" and not (folder / "config.json").is_file():  # the test suite's checkpoint
        from checkpoints import build_hf_model, save_checkpoint, tiny_config

        save_checkpoint(build_hf_model(tiny_config()), folder)
    elif not (folder / "config.json").is_file():
        from checkpoints import write_processor_files
        from idefics3 import Idefics3Config

        write_random_checkpoint(folder, args.preset, dtype=torch.bfloat16)
        config = Idefics3Config.from_pretrained(folder)
        tile = config.vision_config.image_size
        write_processor_files(folder, tile=tile, longest_edge=tile, image_seq_len=config.image_seq_len)
    return folder


def make_inputs(folder: Path, args: argparse.Namespace, device: str) -> dict[str, torch.Tensor]:
    processor = idefics3.load_processor(folder, longest_edge=args.longest_edge, split=not args.no_split)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.images)]
    content = [{"type": "image"}] * args.images + [{"type": "text", "text": "Describe the picture in detail."}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[prompt] * args.batch, images=[images] * args.batch if images else None,
                       return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in inputs.items()}


def run_transformers(model, inputs, n: int) -> tuple[float, float]:
    clock = _Clock()
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
    first, last = clock.times[1], clock.times[-1]
    return first - start, (n - 1) / (last - first)


def run_idefics3(model, inputs, n: int) -> tuple[float, float]:
    times: list[float] = []
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, callback=lambda row, tok: times.append(
        time.perf_counter()) if row == 0 else None)
    first, last = times[0], times[-1]
    return first - start, (n - 1) / (last - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a random checkpoint of --preset)")
    ap.add_argument("--preset", default="SmolVLM-256M-Instruct",
                    help="a name of idefics3.presets, or 'tiny' (the test suite's 6M-parameter checkpoint)")
    ap.add_argument("--dir", default=str(BENCH_DIR))
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--longest-edge", type=int, help="default: the checkpoint's (the preset's tile size for "
                                                       "the random SmolVLM checkpoints: one frame per image)")
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=SHORT_NAMES, help="both models' dtype (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--backend", choices=["auto", "torch"], default="auto",
                    help="our kernel backend: auto (our CPU kernels where they run) or torch (the plain path)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = to_torch_dtype(args.dtype or ("bf16" if args.device == "cuda" else "fp32"))

    from transformers import Idefics3ForConditionalGeneration as HFModel

    folder = prepare(args)
    inputs = make_inputs(folder, args, args.device)
    ours = idefics3.load_model(folder, dtype=dtype, device=args.device, backend=args.backend)
    theirs = HFModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    runners = {"transformers": (run_transformers, theirs), "idefics3": (run_idefics3, ours)}
    n = args.new_tokens
    print(f"checkpoint: {folder}  device {args.device} {str(dtype).replace('torch.', '')}, "
          f"threads {torch.get_num_threads()}")
    print(machine_line() if args.device == "cpu" else f"device: {torch.cuda.get_device_name(args.device)}"
          if args.device.startswith("cuda") else f"device: {args.device}")
    print(f"prompt: batch {args.batch} x {inputs['input_ids'].shape[1]} tokens, "
          f"{inputs['pixel_values'].shape[1] if 'pixel_values' in inputs else 0} frames per row; {n} new tokens")
    with torch.inference_mode():
        for run, model in runners.values():  # warm-up
            run(model, inputs, min(n, 4))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, (run, model) in runners.items():
                results[name].append(run(model, inputs, n))
    ttft = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    tps = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    print(f"{'':<14}{'TTFT (s)':>12}{'decode tok/s':>16}   (medians of {args.repeats}, alternating)")
    for name in runners:
        print(f"{name:<14}{ttft[name]:>12.4f}{tps[name]:>16.1f}")
    print(f"{'ratio':<14}{ttft['transformers'] / ttft['idefics3']:>11.2f}x"
          f"{tps['idefics3'] / tps['transformers']:>15.2f}x   (>1: idefics3 faster)")
    print("\n".join(backend_lines(ours.backend, "idefics3 kernels")))  # after the runs: their derived weights


if __name__ == "__main__":
    main()
