"""CPU speed targets (README, Speed on CPU): idefics3 against transformers' best configuration, one run, alternating.

Workload: a SmolVLM-256M-shaped checkpoint (real configuration, seeded random bf16 weights, the real
SmolVLM processor files), one photo-like 1024x768 image at the default resolution (4x3 tiles + the
global image = 13 frames of 512 px), a short question, 64 new tokens greedy (forced: min_new_tokens).

idefics3 is loaded as users load it (`idefics3.load_model`: bf16 where the CPU has bf16 instructions, the
"auto" kernel backend). Each configuration runs in its own fresh process (so its peak RSS is its own), and the
processes alternate A B C A B C. Printed: the CPU and its ISA, which implementation ran each op
(`model.backend.describe()`); time to first token (preprocessing included) and decode tokens/s
for idefics3 and for transformers in fp32 and bf16 (sdpa); decode as a fraction of the memory-bandwidth
limit (weight bytes read per token / copy bandwidth measured on the spot); the FLOP rate of the vision
encoder + prefill against the bf16 matmul rate measured on the spot; batched decode (8 sequences
against 1: the workload's prompt 8 times, whose keys the rows then share, and 8 different questions about
the image, which share nothing); the encoder-cache hit TTFT; peak resident memory and the memory of the
backend's derived weights (`backend.nbytes()`: the packed copies batched decode runs on). Usage:

    python bench/speed.py [--rounds 3] [--new-tokens 64] [--threads 2] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (  # noqa: E402
    BENCH_DIR,
    backend_lines,
    copy_bandwidth,
    decode_bytes_per_token,
    machine_line,
    run_child,
    write_random_checkpoint,
)

PRESET = "SmolVLM-256M-Instruct"
QUESTION = "What is shown in this picture? Answer in detail."
QUESTIONS = [QUESTION, "Describe the colours.", "How many circles are there?", "What is in the top left corner?",
             "Is this a photo or a drawing?", "Write a caption for it.", "What stands out most?",
             "Which shapes do you see, from left to right?"]  # batch 8 with prompts that differ


def prepare(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_processor_files

    write_random_checkpoint(folder, PRESET, dtype=torch.bfloat16)
    if not (folder / "tokenizer.json").is_file():
        write_processor_files(folder, tile=512, longest_edge=2048, image_seq_len=64)
        gen = {"bos_token_id": 1, "eos_token_id": [49279], "pad_token_id": 2}
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def bf16_matmul_rate(repeats: int = 5) -> float:
    """FLOP/s of a large bf16 matrix multiply shaped like the encoder's MLP (13312 x 768 x 3072)."""
    a = torch.randn(13312, 768, dtype=torch.bfloat16)
    b = torch.randn(768, 3072, dtype=torch.bfloat16)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


CHILD = r"""
import json, sys, time, statistics, torch
import numpy as np
from PIL import Image
which, folder, n_new, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
QUESTION, QUESTIONS = json.loads(sys.argv[6])
torch.set_num_threads(threads)

def photo():
    # smooth colour fields, a few shapes and sensor-like noise: compresses and resizes like a photo
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.stack([128 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in range(3)], -1)
    for _ in range(12):
        cx, cy, r = rng.integers(0, 1024), rng.integers(0, 768), rng.integers(20, 160)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))

def messages(question=QUESTION):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

def peak_mb():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024

image = photo()
out = {"which": which}
if which.startswith("transformers"):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration
    dtype = torch.bfloat16 if which.endswith("bf16") else torch.float32
    processor = AutoProcessor.from_pretrained(folder)
    model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    class Clock:
        def __init__(self): self.times = []
        def put(self, v): self.times.append(time.perf_counter())
        def end(self): pass
    def run(n, batch=1):
        t0 = time.perf_counter()
        prompt = processor.apply_chat_template(messages(), add_generation_prompt=True)
        inputs = processor(text=[prompt] * batch, images=[[image]] * batch, return_tensors="pt", padding=True)
        t_pre = time.perf_counter()
        clock = Clock()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       streamer=clock if batch == 1 else None)
        return t0, t_pre, clock.times[1:], inputs
else:
    # as users load it: idefics3.load_model (the checkpoint's bf16 where the CPU has bf16 instructions, the
    # "auto" kernel backend); TTFT and decode are timed token by token, so this calls generate, not ask
    import idefics3
    processor = idefics3.load_processor(folder)
    model = idefics3.load_model(folder, device="cpu")
    def run(n, batch=1, cached=False, questions=None):
        t0 = time.perf_counter()
        prompts = [processor.apply_chat_template(messages(q), add_generation_prompt=True)
                   for q in questions or [QUESTION] * batch]
        inputs = processor(text=prompts, images=[[image]] * len(prompts), return_tensors="pt", padding=True)
        t_pre = time.perf_counter()
        times = []
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, encoder_cache=cached,
                       callback=lambda row, tok: times.append(time.perf_counter()) if row == 0 else None)
        return t0, t_pre, times, inputs
with torch.inference_mode():
    run(2)  # warm-up: kernels, thread pools, lazy tables
    ttft, pre, decode = [], [], []
    for _ in range(reps):
        t0, t_pre, times, inputs = run(n_new)
        ttft.append(times[0] - t0); pre.append(t_pre - t0); decode.append((n_new - 1) / (times[-1] - times[0]))
    out.update(ttft=statistics.median(ttft), preprocess=statistics.median(pre), decode=statistics.median(decode),
               prompt_tokens=int(inputs["input_ids"].shape[1]), frames=int(inputs["pixel_values"].shape[1]),
               dtype=str(model.dtype).replace("torch.", ""))
    out["peak_mb"] = peak_mb()
    if which == "idefics3":  # extras, after the peak of the shared workload was taken
        out["derived_mb"] = model.backend.nbytes() / 2**20  # before any batch: no packed copies yet
        run(2, batch=8)  # warm-up: the first batch makes the packed weight copies (once per model, ~0.3 s)
        t0, t_pre, times, _ = run(n_new, batch=8)
        out["decode_batch8"] = 8 * (n_new - 1) / (times[-1] - times[0])
        t0, t_pre, times, _ = run(n_new, questions=QUESTIONS)
        out["decode_batch8_distinct"] = 8 * (n_new - 1) / (times[-1] - times[0])
        out["peak_mb_batch8"] = peak_mb()
        out["derived_mb_batch8"] = model.backend.nbytes() / 2**20  # with the packed copies batches decode on
        run(2, cached=True)  # fills the model's encoder cache
        t0, t_pre, times, _ = run(2, cached=True)  # the same image again: the encoder cache answers
        out["ttft_cached"] = times[0] - t0
        out["encoder_cache_hits"] = model.encoder_cache.hits
        out["backend"] = model.backend.describe()  # each op's implementation, the derived weights at the end
print(json.dumps(out))
"""
QUESTIONS_ARG = json.dumps([QUESTION, QUESTIONS])


def encoder_prefill_flops(prompt_tokens: int, frames: int) -> float:
    """FLOPs of the vision encoder over all frames plus the text prefill (matmuls and attention)."""
    from idefics3 import Idefics3Config
    from idefics3.presets import preset

    c = Idefics3Config.from_dict(preset(PRESET))
    v, t = c.vision_config, c.text_config
    s, d, i = v.patches_per_side ** 2, v.hidden_size, v.intermediate_size
    per_frame = (2 * s * 3 * v.patch_size ** 2 * d
                 + v.num_hidden_layers * (2 * s * (4 * d * d + 2 * d * i) + 4 * s * s * d))
    connector = 2 * c.image_seq_len * c.connector_input_size * t.hidden_size
    hd, kv = t.head_dim, t.num_key_value_heads
    per_tok = 2 * t.num_hidden_layers * (t.hidden_size * hd * (2 * t.num_attention_heads + 2 * kv)
                                         + 3 * t.hidden_size * t.intermediate_size)
    attn = 2 * t.num_hidden_layers * t.num_attention_heads * hd * prompt_tokens ** 2  # causal: half of 4·T²·d
    lm_head = 2 * t.hidden_size * t.vocab_size  # only the last position
    return frames * (per_frame + connector) + prompt_tokens * per_tok + attn + lm_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (one process per config per round)")
    ap.add_argument("--reps", type=int, default=1, help="measured runs inside each process")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=str(BENCH_DIR / "speed-smolvlm-256m"))
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = prepare(Path(args.dir))
    configs = ["idefics3"] + ([] if args.skip_transformers else ["transformers-fp32", "transformers-bf16"])
    rows: dict[str, list[dict]] = {c: [] for c in configs}
    bandwidth, matmul = [], []
    for r in range(args.rounds):
        bandwidth.append(copy_bandwidth())
        matmul.append(bf16_matmul_rate())
        for c in configs:
            rows[c].append(run_child(CHILD, c, str(folder), str(args.new_tokens), str(args.reps), str(args.threads),
                                     QUESTIONS_ARG))
            print(f"round {r + 1} {c}: " + json.dumps(rows[c][-1]), flush=True)
    med = lambda c, k: statistics.median(x[k] for x in rows[c])  # noqa: E731
    spread = lambda c, k: (max(x[k] for x in rows[c]) - min(x[k] for x in rows[c])) / 2  # noqa: E731
    bw, mm = statistics.median(bandwidth), statistics.median(matmul)
    print(f"\n{machine_line(args.threads)}")
    print(f"machine: copy bandwidth {bw / 1e9:.1f} GB/s, bf16 matmul {mm / 1e9:.0f} GFLOP/s")
    print("\n".join(backend_lines(rows["idefics3"][0]["backend"], "idefics3 kernels (load_model, backend 'auto')")))
    print(f"{'config':<20}{'dtype':>9}{'TTFT s':>10}{'(prep s)':>10}{'decode tok/s':>14}{'peak MiB':>10}")
    for c in configs:
        print(f"{c:<20}{rows[c][0]['dtype']:>9}{med(c, 'ttft'):>10.3f}{med(c, 'preprocess'):>10.3f}"
              f"{med(c, 'decode'):>14.2f}{med(c, 'peak_mb'):>10.0f}   (decode ±{spread(c, 'decode'):.2f}, "
              f"TTFT ±{spread(c, 'ttft'):.3f})")
    ours = "idefics3"
    from idefics3 import Idefics3Config
    from idefics3.presets import preset

    per_token = decode_bytes_per_token(Idefics3Config.from_dict(preset(PRESET)))
    limit = bw / per_token
    print(f"\ndecode: {med(ours, 'decode'):.2f} tok/s = {med(ours, 'decode') / limit:.0%} of the bandwidth limit "
          f"({limit:.1f} tok/s = {bw / 1e9:.1f} GB/s / {per_token / 1e6:.0f} MB per token)")
    flops = encoder_prefill_flops(rows[ours][0]["prompt_tokens"], rows[ours][0]["frames"])
    compute_s = med(ours, "ttft") - med(ours, "preprocess")
    print(f"encoder+prefill: {flops / 1e12:.2f} TFLOP in {compute_s:.2f} s = {flops / compute_s / 1e9:.0f} GFLOP/s "
          f"= {flops / compute_s / mm:.0%} of the bf16 matmul rate")
    # What 8 rows cost at best: the weights are read once for all rows, but each row reads its own KV cache
    # (prompt + new tokens deep), so bytes per step grow with the batch even when compute is free.
    cfg = Idefics3Config.from_dict(preset(PRESET))
    t = cfg.text_config
    context = rows[ours][0]["prompt_tokens"] + args.new_tokens // 2  # mean depth while decoding
    kv_row = 2 * 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context  # bf16 K and V
    ceiling8 = 8 * (per_token + kv_row) / (per_token + 8 * kv_row)
    kv_new = kv_row * (args.new_tokens // 2) / context  # each row's own part when the prompt's is shared
    ceiling_shared = 8 * (per_token + kv_row) / (per_token + kv_row - kv_new + 8 * kv_new)
    ratios = lambda k: sorted(x[k] / x["decode"] for x in rows[ours])  # noqa: E731  (batch 8 / batch 1, per round)
    per_round = lambda k: ", ".join(f"{r:.2f}" for r in ratios(k))  # noqa: E731
    print(f"batched decode: 8 sequences of one prompt {med(ours, 'decode_batch8'):.1f} tok/s = "
          f"{statistics.median(ratios('decode_batch8')):.2f}x one sequence (median of the rounds' ratios "
          f"{per_round('decode_batch8')}; bandwidth ceiling {ceiling_shared:.1f}x with the prompt's KV cache read "
          f"once); 8 different questions {med(ours, 'decode_batch8_distinct'):.1f} tok/s = "
          f"{statistics.median(ratios('decode_batch8_distinct')):.2f}x (rounds {per_round('decode_batch8_distinct')}; "
          f"ceiling {ceiling8:.1f}x: "
          f"{per_token / 1e6:.0f} MB of weights + {kv_row / 1e6:.1f} MB of KV cache per row at {context} tokens); "
          f"peak memory after them {med(ours, 'peak_mb_batch8'):.0f} MiB (with the packed weight copies that "
          f"batches decode on: derived weights {med(ours, 'derived_mb'):.1f} MiB before the first batch, "
          f"{med(ours, 'derived_mb_batch8'):.1f} MiB after)")
    print(f"encoder cache hit: TTFT {med(ours, 'ttft_cached'):.3f} s (miss {med(ours, 'ttft'):.3f} s; "
          f"{rows[ours][0]['encoder_cache_hits']} hit(s) in round 1, 1 expected)")
    if not args.skip_transformers:
        best_decode = max(med(c, "decode") for c in configs[1:])
        best_ttft = min(med(c, "ttft") for c in configs[1:])
        best_mem = min(med(c, "peak_mb") for c in configs[1:])
        print(f"\nvs transformers' best: decode {med(ours, 'decode') / best_decode:.2f}x, "
              f"TTFT {best_ttft / med(ours, 'ttft'):.2f}x faster, peak memory {med(ours, 'peak_mb') / best_mem:.2f}x")
        fastest = min(configs[1:], key=lambda c: med(c, "ttft"))
        theirs = flops / (med(fastest, "ttft") - med(fastest, "preprocess")) / mm
        need = flops / ((best_ttft / 1.3) - med(ours, "preprocess")) / mm
        print(f"TTFT ceiling: {fastest}'s encoder+prefill already runs at {theirs:.0%} of the bf16 matmul rate; "
              f"1.3x faster than it needs {need:.0%} (with our preprocessing)")


if __name__ == "__main__":
    main()
