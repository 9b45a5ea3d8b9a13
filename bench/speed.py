"""CPU speed targets (README, Speed on CPU): idefics3 against transformers' best configuration, one run, alternating.

Workload (`--preset`, default SmolVLM-256M-Instruct): a checkpoint of the preset's real configuration with
seeded random bf16 weights and the real SmolVLM processor files, one photo-like 1024x768 image, a short
question, new tokens greedy (forced: min_new_tokens).
- SmolVLM-256M-Instruct: the default resolution (4x3 tiles + the global image = 13 frames of 512 px, 64 image
  tokens each; 881 prompt tokens), 64 new tokens; transformers in fp32 and bf16.
- Idefics3-8B-Llama3 (SigLIP-so400m at 364 px, Llama-3.1-8B text, 8.46B parameters, 16 GB in bf16): the photo
  resized to 728 px (2x2 tiles + the global image = 5 frames of 364 px, 169 image tokens each; 877 prompt
  tokens), 16 new tokens; transformers in bf16 only (its fp32 needs 34 GB); the batched-decode and
  encoder-cache extras are skipped (too slow, too big for a 23 GB machine). The weights are written shard by
  shard (~2 GB each, `common.write_random_shards`), never built in fp32 nor held whole. The 8B tokenizer is
  not public here, so the SmolVLM tokenizer stands in (its ids fit the 128259-row embedding); the config's
  image_token_id is set to that tokenizer's `<image>` id (49190, not the model card's 128257), since the
  processor takes the id from the tokenizer and the model from the config, and they must agree.
The checkpoint folder (`--dir`, default /tmp/idefics3-bench/speed-<preset>) is reused when present. Its weight
files are read once before the runs and again before each process, so each load starts from the page cache
where the RAM allows; each read's speed is printed (over 3 GB/s: from the page cache, not the disk) with
whether the RAM can hold them.

`--isa LEVEL` (amx, avx512_bf16, avx512, avx2, none) makes every process of the run behave as a CPU that stops
at that level: IDEFICS3_CPU_ISA for our kernels and dtype choice, and the same cap for PyTorch and oneDNN in
every configuration, ours and transformers' (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY: `common.ISA_CAPS`), so the
comparison stays fair. Without bf16 instructions (avx512, avx2, none) idefics3 loads in fp32, as
`idefics3.load_model` picks, and transformers' bf16 still runs (its best is whichever is faster).

idefics3 is loaded as users load it (`idefics3.load_model`: bf16 where the CPU has bf16 instructions, the
"auto" kernel backend). Each configuration runs in its own fresh process (so its peak RSS is its own; one at a
time, never two models in memory), and the processes alternate A B C A B C. Printed: the CPU and its ISA (and
the forced level with the variables it caps), which implementation ran each op (`model.backend.describe()`);
time to first token (preprocessing included) and decode tokens/s for idefics3 and for transformers (sdpa);
decode as a fraction of the memory-bandwidth limit (the preset's weight bytes read per token / copy bandwidth
measured on the spot); the FLOP rate of the vision encoder + prefill against the matmul rate measured on the
spot (in idefics3's dtype, under the same ISA cap, shaped like the preset's encoder MLP); for SmolVLM, batched
decode (8 sequences against 1: the workload's prompt 8 times, whose keys the rows then share, and 8 different
questions about the image, which share nothing) and the encoder-cache hit TTFT; peak resident memory and the
memory of the backend's derived weights (`backend.nbytes()`: the packed copies batched decode runs on). Usage:

    python bench/speed.py [--rounds 3] [--new-tokens 64] [--threads 2] [--skip-transformers]
                          [--isa {amx,avx512_bf16,avx512,avx2,none}] [--preset Idefics3-8B-Llama3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import (  # noqa: E402
    BENCH_DIR,
    ISA_CAPS,
    backend_lines,
    copy_bandwidth,
    decode_bytes_per_token,
    isa_env,
    machine_line,
    meminfo_bytes,
    read_once,
    run_child,
    weight_files,
    write_random_checkpoint,
    write_random_shards,
)

PRESET = "SmolVLM-256M-Instruct"  # the default --preset
# Per preset: the checkpoint folder under BENCH_DIR, the processor's resize (`longest_edge`: the photo's longest
# side before tiling; the tile is the vision config's image_size), the frames that gives for the 1024x768 photo
# (the matmul yardstick's shape; the children report the real count), the default new tokens, whether the
# batched-decode and encoder-cache extras run, transformers' configurations, and the shard size
# (None: the model is built and saved whole by write_random_checkpoint; else streamed by write_random_shards).
WORKLOADS: dict[str, dict] = {
    "SmolVLM-256M-Instruct": dict(folder="speed-smolvlm-256m", longest_edge=2048, frames=13, new_tokens=64,
                                  extras=True, transformers=("transformers-fp32", "transformers-bf16"),
                                  shard=None),
    "Idefics3-8B-Llama3": dict(folder="speed-idefics3-8b", longest_edge=728, frames=5, new_tokens=16,
                               extras=False, transformers=("transformers-bf16",), shard=2 * 10**9),
}
QUESTION = "What is shown in this picture? Answer in detail."
QUESTIONS = [QUESTION, "Describe the colours.", "How many circles are there?", "What is in the top left corner?",
             "Is this a photo or a drawing?", "Write a caption for it.", "What stands out most?",
             "Which shapes do you see, from left to right?"]  # batch 8 with prompts that differ


def prepare(folder: Path, name: str = PRESET) -> Path:
    """The preset's checkpoint folder (reused when complete): processor files, generation_config.json and
    random bf16 weights (streamed shard by shard for the presets that have a shard size)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_processor_files
    from idefics3.presets import preset

    work, config = WORKLOADS[name], preset(name)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokenizer.json").is_file():
        v = config["vision_config"]
        tile = v.get("image_size", 224)
        seq = (tile // v["patch_size"]) ** 2 // config["scale_factor"] ** 2
        write_processor_files(folder, tile=tile, longest_edge=work["longest_edge"], image_seq_len=seq)
        gen = {"bos_token_id": 1, "eos_token_id": [49279], "pad_token_id": 2}  # the SmolVLM tokenizer's ids
        (folder / "generation_config.json").write_text(json.dumps(gen))
    if work["shard"] is None:
        write_random_checkpoint(folder, name, dtype=torch.bfloat16)
    else:
        # the processor takes the <image> id from the tokenizer written above, the model from config.json
        added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        config["image_token_id"] = next(t["id"] for t in added if t["content"] == "<image>")
        write_random_shards(folder, config, max_shard_size=work["shard"])
    return folder


CACHED_RATE = 3e9  # bytes/s: a read faster than this came from the page cache, not the disk

# The matmul yardstick, in a child so that it runs under the same ISA cap as the models, in the dtype
# idefics3.load_model picks there (bf16 where the CPU, as capped, has bf16 instructions, else fp32).
MATMUL_CHILD = r"""
import json, sys, time, torch
from idefics3.device import cpu_isa, default_dtype
m, k, n, threads = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
dtype = default_dtype("cpu")
a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
a @ b
best = float("inf")
for _ in range(5):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(json.dumps({"rate": 2 * m * k * n / best, "dtype": str(dtype).replace("torch.", ""), "isa": cpu_isa(),
                  "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def matmul_rate(config, frames: int, threads: int, env: dict[str, str]) -> dict:
    """FLOP/s of a large matrix multiply shaped like the encoder's MLP over the workload's frames
    (SmolVLM-256M: 13312 x 768 x 3072; 8B: 3380 x 1152 x 4304), measured in a child under `env`."""
    v = config.vision_config
    return run_child(MATMUL_CHILD, str(frames * v.patches_per_side ** 2), str(v.hidden_size),
                     str(v.intermediate_size), str(threads), env=env)


CHILD = r"""
import json, sys, time, statistics, torch
import numpy as np
from PIL import Image
which, folder, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
n_new, reps, threads, extras = opts["new_tokens"], opts["reps"], opts["threads"], opts["extras"]
QUESTION, QUESTIONS = opts["question"], opts["questions"]
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

WITH_IMAGE = opts.get("image", True)  # False: a text-only prompt (decode over a short cache)

def messages(question=QUESTION):
    image_part = [{"type": "image"}] if WITH_IMAGE else []
    return [{"role": "user", "content": [*image_part, {"type": "text", "text": question}]}]

def peak_mb():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024

image = photo()
out = {"which": which, "aten": torch.backends.cpu.get_cpu_capability()}
t_load = time.perf_counter()
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
        inputs = processor(text=[prompt] * batch, images=[[image]] * batch if WITH_IMAGE else None,
                           return_tensors="pt", padding=True)
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
    out["isa"] = idefics3.device.cpu_isa()
    def run(n, batch=1, cached=False, questions=None):
        t0 = time.perf_counter()
        prompts = [processor.apply_chat_template(messages(q), add_generation_prompt=True)
                   for q in questions or [QUESTION] * batch]
        inputs = processor(text=prompts, images=[[image]] * len(prompts) if WITH_IMAGE else None,
                           return_tensors="pt", padding=True)
        t_pre = time.perf_counter()
        times = []
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, encoder_cache=cached,
                       callback=lambda row, tok: times.append(time.perf_counter()) if row == 0 else None)
        return t0, t_pre, times, inputs
out["load_s"] = time.perf_counter() - t_load  # processor + weights: seconds, or more where read from disk
with torch.inference_mode():
    run(2)  # warm-up: kernels, thread pools, lazy tables
    ttft, pre, decode = [], [], []
    for _ in range(reps):
        t0, t_pre, times, inputs = run(n_new)
        ttft.append(times[0] - t0); pre.append(t_pre - t0); decode.append((n_new - 1) / (times[-1] - times[0]))
    out.update(ttft=statistics.median(ttft), preprocess=statistics.median(pre), decode=statistics.median(decode),
               prompt_tokens=int(inputs["input_ids"].shape[1]),
               frames=int(inputs["pixel_values"].shape[1]) if WITH_IMAGE else 0,
               dtype=str(model.dtype).replace("torch.", ""))
    out["peak_mb"] = peak_mb()
    if which == "idefics3":
        out["derived_mb"] = model.backend.nbytes() / 2**20  # before any batch: no packed copies yet
        out["backend"] = model.backend.describe()  # each op's implementation, the derived weights at the end
    if which == "idefics3" and extras:  # extras, after the peak of the shared workload was taken
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
        out["backend"] = model.backend.describe()  # now with the packed copies batches decode on
print(json.dumps(out))
"""


def encoder_prefill_flops(c, prompt_tokens: int, frames: int) -> float:
    """FLOPs of the vision encoder over all frames plus the text prefill (matmuls and attention), for the
    Idefics3Config `c`."""
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


def isa_lines(level: str | None, env: dict[str, str], aten: str) -> str:
    """The forced ISA level and what it caps, for the header (next to machine_line)."""
    if level is None:
        return f"isa: not forced (the CPU's own; ATen dispatches {aten} code)"
    caps = " ".join(f"{k}={v}" for k, v in env.items())
    capped = "" if ISA_CAPS[level] else " (the highest level: PyTorch and oneDNN are not capped)"
    return f"isa: forced to {level} for every process of the run: {caps}{capped}; ATen dispatches {aten} code there"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (one process per config per round)")
    ap.add_argument("--reps", type=int, default=1, help="measured runs inside each process")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="new tokens per answer (default: 64 for SmolVLM-256M, 16 for the 8B)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default=PRESET, choices=list(WORKLOADS),
                    help="the model shapes to compare at (idefics3.presets)")
    ap.add_argument("--isa", choices=list(ISA_CAPS), default=None,
                    help="cap the instruction set of every process (ours and transformers'); default: "
                         "$IDEFICS3_CPU_ISA if set, else the CPU's own")
    ap.add_argument("--dir", default=None, help="checkpoint folder (default: BENCH_DIR/<the preset's folder>)")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    from idefics3 import Idefics3Config
    from idefics3.device import ENV_ISA, cpu_isa
    from idefics3.presets import preset

    work = WORKLOADS[args.preset]
    new_tokens = args.new_tokens if args.new_tokens is not None else work["new_tokens"]
    level = args.isa or os.environ.get(ENV_ISA, "").strip().lower() or None
    env = isa_env(level)
    if level is not None:
        os.environ[ENV_ISA] = level  # for this process's machine_line; the children get all of `env`
        cpu_isa()  # a level above the CPU's is refused here, naming the CPU's
    torch.set_num_threads(args.threads)
    config = Idefics3Config.from_dict(preset(args.preset))
    with torch.device("meta"):
        from idefics3 import Idefics3

        n_params = sum(p.numel() for p in Idefics3(config).parameters())
    print(f"preset {args.preset}: {n_params / 1e9:.2f}B parameters; {machine_line(args.threads)}", flush=True)
    folder = prepare(Path(args.dir) if args.dir else BENCH_DIR / work["folder"], args.preset)
    files = weight_files(folder)
    size, secs = read_once(files)
    ram = meminfo_bytes("MemTotal")
    if 2 * size < 0.9 * ram:
        room = "the page cache holds them with room for a process's own copy beside them"
    elif size < 0.9 * ram:
        room = (f"{ram / 1e9:.0f} GB of RAM hold them in the page cache for a process that maps the files, but not "
                f"beside a copy of them: a loader that copies may evict part")
    else:
        room = f"larger than the RAM allows to cache ({ram / 1e9:.0f} GB): loads read part from disk"
    print(f"weights: {size / 1e9:.2f} GB in {len(files)} file(s) of {folder}, first read {secs:.1f} s "
          f"({size / secs / 1e9:.2f} GB/s{', already cached' if size / secs > CACHED_RATE else ''}); {room}",
          flush=True)
    reads: list[float] = [size / secs]  # bytes/s of each read: the first, then the one before each process
    configs = ["idefics3"] + ([] if args.skip_transformers else list(work["transformers"]))
    rows: dict[str, list[dict]] = {c: [] for c in configs}
    opts = json.dumps(dict(new_tokens=new_tokens, reps=args.reps, threads=args.threads, extras=work["extras"],
                           question=QUESTION, questions=QUESTIONS))
    bandwidth, matmul = [], []
    for r in range(args.rounds):
        bandwidth.append(copy_bandwidth())
        matmul.append(matmul_rate(config, work["frames"], args.threads, env))
        if r == 0:
            print(isa_lines(level, env, matmul[0]["aten"]), flush=True)
            need = n_params * (2 if matmul[0]["dtype"] == "bfloat16" else 4)
            if need > 0.9 * ram:
                raise SystemExit(f"idefics3 would load this model in {matmul[0]['dtype']} here ({need / 1e9:.0f} GB "
                                 f"of weights; RAM {ram / 1e9:.0f} GB): pick an ISA level with bf16 instructions "
                                 f"(avx512_bf16 or amx) or a smaller preset")
        for c in configs:
            size, secs = read_once(files)  # each process starts with the weights in the page cache, RAM allowing
            reads.append(size / secs)
            rows[c].append(run_child(CHILD, c, str(folder), opts, env=env))
            rows[c][-1]["weights_read_gbs"] = size / secs / 1e9
            print(f"round {r + 1} {c}: " + json.dumps(rows[c][-1]), flush=True)
    med = lambda c, k: statistics.median(x[k] for x in rows[c])  # noqa: E731
    spread = lambda c, k: (max(x[k] for x in rows[c]) - min(x[k] for x in rows[c])) / 2  # noqa: E731
    bw = statistics.median(bandwidth)
    mm, mm_dtype = statistics.median(m["rate"] for m in matmul), matmul[0]["dtype"]
    print(f"\n{machine_line(args.threads)}")
    print(isa_lines(level, env, matmul[0]["aten"]))
    print(f"machine: copy bandwidth {bw / 1e9:.1f} GB/s, {mm_dtype} matmul {mm / 1e9:.0f} GFLOP/s")
    later = reads[1:]
    print(f"weights: {size / 1e9:.2f} GB, read before each process: {reads[0] / 1e9:.2f} GB/s the first time, then "
          f"{min(later) / 1e9:.2f}-{max(later) / 1e9:.2f} GB/s: "
          + ("every process started with them in the page cache" if min(later) > CACHED_RATE else
             "some reads came from disk (under 3 GB/s), so not every process found them cached")
          + f"; {room}")
    print("\n".join(backend_lines(rows["idefics3"][0]["backend"], "idefics3 kernels (load_model, backend 'auto')")))
    print(f"{'config':<20}{'dtype':>9}{'load s':>8}{'TTFT s':>10}{'(prep s)':>10}{'decode tok/s':>14}"
          f"{'peak MiB':>10}")
    for c in configs:
        print(f"{c:<20}{rows[c][0]['dtype']:>9}{med(c, 'load_s'):>8.1f}{med(c, 'ttft'):>10.3f}"
              f"{med(c, 'preprocess'):>10.3f}{med(c, 'decode'):>14.2f}{med(c, 'peak_mb'):>10.0f}   "
              f"(decode ±{spread(c, 'decode'):.2f}, TTFT ±{spread(c, 'ttft'):.3f})")
    print("(load s: processor + weights, and for idefics3 the kernel backend's calibration, which is cached per "
          "machine and shape after its first run)")
    ours = "idefics3"
    dtype_bytes = 2 if rows[ours][0]["dtype"] in ("bfloat16", "float16") else 4
    per_token = decode_bytes_per_token(config, dtype_bytes)
    limit = bw / per_token
    print(f"\ndecode: {med(ours, 'decode'):.2f} tok/s = {med(ours, 'decode') / limit:.0%} of the bandwidth limit "
          f"({limit:.1f} tok/s = {bw / 1e9:.1f} GB/s / {per_token / 1e6:.0f} MB per token)")
    flops = encoder_prefill_flops(config, rows[ours][0]["prompt_tokens"], rows[ours][0]["frames"])
    compute_s = med(ours, "ttft") - med(ours, "preprocess")
    print(f"encoder+prefill: {flops / 1e12:.2f} TFLOP in {compute_s:.2f} s = {flops / compute_s / 1e9:.0f} GFLOP/s "
          f"= {flops / compute_s / mm:.0%} of the {mm_dtype} matmul rate")
    if work["extras"]:
        # What 8 rows cost at best: the weights are read once for all rows, but each row reads its own KV cache
        # (prompt + new tokens deep), so bytes per step grow with the batch even when compute is free.
        t = config.text_config
        context = rows[ours][0]["prompt_tokens"] + new_tokens // 2  # mean depth while decoding
        kv_row = 2 * dtype_bytes * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context  # K and V
        ceiling8 = 8 * (per_token + kv_row) / (per_token + 8 * kv_row)
        kv_new = kv_row * (new_tokens // 2) / context  # each row's own part when the prompt's is shared
        ceiling_shared = 8 * (per_token + kv_row) / (per_token + kv_row - kv_new + 8 * kv_new)
        ratios = lambda k: sorted(x[k] / x["decode"] for x in rows[ours])  # noqa: E731  (batch 8 / 1, per round)
        per_round = lambda k: ", ".join(f"{r:.2f}" for r in ratios(k))  # noqa: E731
        print(f"batched decode: 8 sequences of one prompt {med(ours, 'decode_batch8'):.1f} tok/s = "
              f"{statistics.median(ratios('decode_batch8')):.2f}x one sequence (median of the rounds' ratios "
              f"{per_round('decode_batch8')}; bandwidth ceiling {ceiling_shared:.1f}x with the prompt's KV cache "
              f"read once); 8 different questions {med(ours, 'decode_batch8_distinct'):.1f} tok/s = "
              f"{statistics.median(ratios('decode_batch8_distinct')):.2f}x (rounds "
              f"{per_round('decode_batch8_distinct')}; ceiling {ceiling8:.1f}x: "
              f"{per_token / 1e6:.0f} MB of weights + {kv_row / 1e6:.1f} MB of KV cache per row at {context} "
              f"tokens); peak memory after them {med(ours, 'peak_mb_batch8'):.0f} MiB (with the packed weight "
              f"copies that batches decode on: derived weights {med(ours, 'derived_mb'):.1f} MiB before the "
              f"first batch, {med(ours, 'derived_mb_batch8'):.1f} MiB after)")
        print(f"encoder cache hit: TTFT {med(ours, 'ttft_cached'):.3f} s (miss {med(ours, 'ttft'):.3f} s; "
              f"{rows[ours][0]['encoder_cache_hits']} frame hit(s) in round 1, {rows[ours][0]['frames']} expected: "
              f"every frame of the image)")
    else:
        print(f"derived weights {med(ours, 'derived_mb'):.1f} MiB; batched decode and encoder-cache extras "
              f"skipped for {args.preset}")
    if not args.skip_transformers:
        best_decode = max(med(c, "decode") for c in configs[1:])
        best_ttft = min(med(c, "ttft") for c in configs[1:])
        best_mem = min(med(c, "peak_mb") for c in configs[1:])
        print(f"\nvs transformers' best ({', '.join(configs[1:])}): decode {med(ours, 'decode') / best_decode:.2f}x, "
              f"TTFT {best_ttft / med(ours, 'ttft'):.2f}x faster, peak memory {med(ours, 'peak_mb') / best_mem:.2f}x")
        fastest = min(configs[1:], key=lambda c: med(c, "ttft"))
        theirs = flops / (med(fastest, "ttft") - med(fastest, "preprocess")) / mm
        need = flops / ((best_ttft / 1.3) - med(ours, "preprocess")) / mm
        print(f"TTFT ceiling: {fastest}'s encoder+prefill already runs at {theirs:.0%} of the {mm_dtype} matmul "
              f"rate; 1.3x faster than it needs {need:.0%} (with our preprocessing)")


if __name__ == "__main__":
    main()
