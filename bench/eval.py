"""`idefics3 eval` throughput: the harness (engine, many questions in flight) against a sequential loop of
`model.generate` over the same samples, and against transformers' `generate`, side by side.

The data is a synthetic DocVQA split in the published layout (`lmms-lab/DocVQA`: DocVQA/validation-*.parquet,
--pages pages of drawn text, --per-page questions about each, as the real set has about four), read by the
harness's own reader. 16 pages (64 samples) by default: a run of a few samples measures its start and its tail
(the first batch waits for all its inputs; the last steps run half empty), a real split (DocVQA validation:
5349 questions) is almost all steady state, where the harness's worker encodes the next pages while the engine
decodes. The model is, by default, a seeded random checkpoint of SmolVLM-256M's exact shapes with
the SmolVLM processor files (one 512-px frame per page), or any --model (`demo`: the built-in model). Every path
answers every sample greedily with --max-new-tokens, from reading the parquet to scoring the answer:

    eval         harness.evaluate with the EngineBackend (--batch in flight; records, scoring, results JSON)
    sequential   for each sample: decode the page, processor(text, images), idefics3 generate, decode, score
    transformers the same loop with transformers' Idefics3ForConditionalGeneration.generate (--no-transformers)

Models are loaded once, before timing; each path runs once to warm up, then the paths alternate (A B C A B C) for
--rounds, since the machine is shared and noisy. Every run starts cold: the model's image-feature cache is
emptied and the harness gets a fresh engine (an empty prefix cache), as a new command would; --warm-images
keeps the features instead, which leaves the language side alone (the vision encoder costs both idefics3 paths
the same: `generate` reuses features of an image it has seen, too). Printed: the CPU and
threads, which kernel ran each op, each round's samples/s, the medians, the ratios, the number of tokens each
path generated (equal work: random weights never stop early) and how many of the harness's answers equal the
sequential loop's. Target: eval >= 4x sequential.

    python bench/eval.py [--model DIR|demo] [--pages 16] [--per-page 4] [--max-new-tokens 32] [--batch 16]
                         [--rounds 3] [--threads 1] [--dtype bf16|fp32] [--no-transformers] [--no-encode-ahead]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import idefics3  # noqa: E402
from common import BENCH_DIR, backend_lines, machine_line, summary, write_random_checkpoint  # noqa: E402
from idefics3.eval.benchmarks import get_tasks  # noqa: E402
from idefics3.eval.cli import DEFAULT_BATCH  # noqa: E402
from idefics3.eval.harness import Settings, evaluate, list_samples  # noqa: E402
from idefics3.eval.prompts import settings_for  # noqa: E402
from idefics3.eval.runner import EngineBackend  # noqa: E402

TARGET = 4.0


def checkpoint(args: argparse.Namespace) -> Path:
    if args.model == "demo":
        return idefics3.DEMO_MODEL
    if args.model:
        return Path(args.model)
    folder = Path(args.dir) / "SmolVLM-256M-Instruct"
    if not (folder / "tokenizer.json").is_file():
        from checkpoints import write_processor_files

        write_random_checkpoint(folder, "SmolVLM-256M-Instruct", dtype=torch.bfloat16)
        config = idefics3.Idefics3Config.from_pretrained(folder)
        tile = config.vision_config.image_size
        write_processor_files(folder, tile=tile, longest_edge=tile, image_seq_len=config.image_seq_len)
    return folder


def dataset(folder: Path, pages: int, per_page: int) -> Path:
    """A DocVQA validation split in the Hub layout: pages of drawn text, `per_page` questions each."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for page in range(pages):
        img = Image.new("RGB", (640, 820), (250, 250, 245))
        draw = ImageDraw.Draw(img)
        for line in range(24):
            draw.text((30, 30 + 32 * line), f"Invoice {page}-{line}: total {17 * line + page} dollars", fill=(0, 0, 0))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        for q in range(per_page):
            rows.append({"questionId": str(page * 100 + q), "question": f"What is the total on line {q * 3}?",
                         "question_types": ["form"], "image": {"bytes": buffer.getvalue(), "path": None},
                         "docId": page, "ucsf_document_id": "", "ucsf_document_page_no": "1",
                         "answers": [f"{17 * q * 3 + page} dollars"], "data_split": "validation"})
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("questionId", pa.string()), ("question", pa.string()),
                        ("question_types", pa.list_(pa.string())), ("image", image), ("docId", pa.int64()),
                        ("ucsf_document_id", pa.string()), ("ucsf_document_page_no", pa.string()),
                        ("answers", pa.list_(pa.string())), ("data_split", pa.string())])
    (folder / "DocVQA").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "DocVQA" / "validation-00000-of-00001.parquet",
                   row_group_size=8)
    return folder


class Eval:
    """The harness as `idefics3 eval` runs it, the model already loaded: a fresh engine (and so an empty prefix
    cache) each run, as each command starts with."""

    def __init__(self, model, processor, data: Path, args: argparse.Namespace) -> None:
        self.model, self.processor, self.data, self.args = model, processor, data, args
        self.tokens = 0
        self.answers: list[str] = []

    def __call__(self, limit: int | None = None) -> int:
        out = Path(tempfile.mkdtemp(prefix="idefics3-bench-eval-"))
        settings = Settings(data=str(self.data), limit=limit, output=out, overwrite=True,
                            max_new_tokens=self.args.max_new_tokens, progress=False)
        backend = EngineBackend(self.model, self.processor, batch=self.args.batch,
                                encode_ahead=False if self.args.no_encode_ahead else None)
        (result,) = evaluate(get_tasks("docvqa"), settings, lambda: backend, {})
        self.tokens = backend.tokens_generated
        self.answers = [r["answer"] for r in result.records]
        return len(result.records)


class Loop:
    """One sample at a time: read, processor, generate, decode, score."""

    def __init__(self, model, processor, data: Path, args: argparse.Namespace, transformers: bool) -> None:
        self.model, self.processor, self.args, self.hf = model, processor, args, transformers
        (self.task,) = get_tasks("docvqa")
        self.samples = list_samples(self.task, Settings(data=str(data)))[1]
        self.prompts = settings_for("docvqa")
        self.tokens = 0
        self.answers: list[str] = []

    def __call__(self, limit: int | None = None) -> int:
        self.tokens = 0
        self.answers = []
        for sample in self.samples[:limit]:
            image, _ = sample.images[0].load()
            prompt = self.task.prompt(sample, self.prompts)
            content = [{"type": "image"}, {"type": "text", "text": prompt.text}]
            text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
            inputs = self.processor(text=text, images=[image], return_tensors="pt")
            n = inputs["input_ids"].shape[1]
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.args.max_new_tokens, do_sample=False)
            new = out[0, n:].tolist()
            self.tokens += len(new)
            answer = self.processor.batch_decode([new], skip_special_tokens=True)[0].strip()
            self.task.score(answer, sample)
            self.answers.append(answer)
        return len(self.samples[:limit])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder, or 'demo' (default: random SmolVLM-256M shapes)")
    ap.add_argument("--dir", default=str(BENCH_DIR))
    ap.add_argument("--pages", type=int, default=16)
    ap.add_argument("--per-page", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="as the docvqa task (lmms-eval: 32)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="as idefics3 eval's default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="every path's weights (default: idefics3 eval's, bf16 "
                    "where the CPU has bf16 instructions)")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false")
    ap.add_argument("--no-encode-ahead", action="store_true",
                    help="the harness encodes images inside the engine's steps (no overlap with decoding)")
    ap.add_argument("--warm-images", action="store_true",
                    help="keep the pages' image features from the warm-up (both idefics3 paths; transformers has no "
                         "such cache): isolates the language side, where batching acts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = checkpoint(args)
    data = dataset(Path(tempfile.mkdtemp(prefix="idefics3-bench-docvqa-")), args.pages, args.per_page)
    processor = idefics3.load_processor(folder)
    model = idefics3.load_model(folder, dtype=args.dtype)
    args.dtype = str(model.dtype).removeprefix("torch.")
    paths = {"eval": Eval(model, processor, data, args), "sequential": Loop(model, processor, data, args, False)}
    if args.transformers:
        from transformers import AutoProcessor, Idefics3ForConditionalGeneration

        dtype = model.dtype
        hf = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        paths["transformers"] = Loop(hf, AutoProcessor.from_pretrained(folder), data, args, True)
    n = args.pages * args.per_page
    print(machine_line())
    print("\n".join(backend_lines(model.backend)))
    print(f"model: {folder} ({args.dtype}); data: DocVQA layout, {args.pages} pages x {args.per_page} questions; "
          f"{args.max_new_tokens} new tokens; eval --batch {args.batch}; image features "
          f"{'kept from the warm-up' if args.warm_images else 'cold every run'}"
          f"{'; images encoded inside the engine steps' if args.no_encode_ahead else ''}")
    for run in paths.values():  # warm-up: first-call costs, kernels, allocator
        run(min(n, 2 * args.per_page))
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.rounds):
        line = []
        for name, run in paths.items():
            cache = getattr(run.model, "encoder_cache", None)
            if cache is not None and not args.warm_images:  # cold: image features of an earlier run not reused
                cache.clear()
            start = time.perf_counter()
            done = run()
            rates[name].append(done / (time.perf_counter() - start))
            line.append(f"{name} {rates[name][-1]:.3f}/s ({run.tokens} tokens)")
        print(f"round {i + 1}: " + ", ".join(line))
    same = sum(a == b for a, b in zip(paths["eval"].answers, paths["sequential"].answers))
    print(f"answers of eval equal to sequential generate's: {same}/{n}")
    for name, values in rates.items():
        print(summary(f"{name} samples/s", values, "/s"))
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"eval / sequential: {med['eval'] / med['sequential']:.2f}x (target >= {TARGET:.0f}x: "
          f"{'met' if med['eval'] / med['sequential'] >= TARGET else 'NOT met'})")
    if "transformers" in med:
        print(f"eval / transformers: {med['eval'] / med['transformers']:.2f}x; "
              f"sequential / transformers: {med['sequential'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()
