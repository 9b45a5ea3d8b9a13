"""LoRA training throughput and peak memory on a SmolVLM-256M-shaped model: idefics3 against transformers + peft.

Both sides run the same LoRA step (r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down of every tower, AdamW,
clipping at 1.0) on the same synthetic batch: one 512x512 image per sample (one frame, 64 image tokens), text
around it, and the loss on a short assistant answer. idefics3 loads through `idefics3.load_model` with
backend="torch" (training runs the plain path, as `idefics3 finetune` does: the CPU kernels are inference-only)
and uses its fine-tuning objective (output head only on labelled positions); transformers + peft computes
logits everywhere, as its Trainer does. Throughput: both models in one process, stepping alternately A B A B,
so that a noisy machine slows both alike; we report the median tokens/s and the median of the per-pair ratios.
Peak memory: each implementation in fresh processes, alternating. GPU: bf16 autocast on bf16 base weights, peak
`torch.cuda.max_memory_allocated` above the loaded model; CPU: float32, peak resident memory above the RSS after
loading. Also printed: the device (on CPU, its model and ISA) and which implementation each op of our model ran
(`model.backend.describe()`). Usage:
    python bench/finetune.py [--repeats 3] [--steps 6] [--batch-size 2] [--text-tokens 256] [--answer-tokens 32]
                             [--dir /tmp/idefics3-bench/smolvlm-256m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BENCH_DIR, backend_lines, machine_line, run_child, summary, write_random_checkpoint  # noqa: E402

CHILD = r"""
import json, statistics, sys, time, torch
mode, folder, steps, batch_size, text_tokens, answer = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
dtype = torch.bfloat16 if cuda else torch.float32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def peak_rss_mb():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024

def make_batch(config, image_seq):
    # [BOS] text [F G I*S F] text answer; every row the same length, loss on the answer only.
    g = torch.Generator().manual_seed(0)
    half, rows = text_tokens // 2, []
    text = lambda n: torch.randint(100, 40000, (n,), generator=g)
    for _ in range(batch_size):
        rows.append(torch.cat([torch.tensor([1]), text(half), torch.tensor([49189, 49152]),
                               torch.full((image_seq,), config.image_token_id), torch.tensor([49189]),
                               text(text_tokens - half), text(answer)]))
    ids = torch.stack(rows)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    size = config.vision_config.image_size
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(batch_size, 1, 3, size, size, generator=g),
             "pixel_attention_mask": torch.ones(batch_size, 1, size, size, dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()}

def build(which):
    torch.manual_seed(0)
    if which == "idefics3":
        from idefics3 import load_model
        from idefics3.finetune.lora import LoraSettings, inject_lora, mark_only_lora_trainable
        from idefics3.finetune.objective import TokenLoss
        model = load_model(folder, dtype=dtype, device=device, backend="torch")  # training: the plain path
        described = model.backend.describe()
        inject_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, targets=TARGETS))
        mark_only_lora_trainable(model)
        objective = TokenLoss(model)
        loss_of = lambda b: objective(**b) / int((b["labels"][:, 1:] != -100).sum())
        image_seq = model.config.image_seq_len
    else:
        import warnings; warnings.simplefilter("ignore")
        from transformers import Idefics3ForConditionalGeneration
        from peft import LoraConfig, get_peft_model
        model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
        loss_of = lambda b: model(**b).loss
        v = model.config.vision_config
        image_seq = (v.image_size // v.patch_size) ** 2 // model.config.scale_factor ** 2
        described = None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    batch = make_batch(model.config, image_seq)
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss)
    return step, int(batch["attention_mask"].sum()), batch["input_ids"].shape[1], described

if mode == "speed":  # both in one process, alternating step by step: load drift hits both alike
    runs = {w: build(w) for w in ("idefics3", "transformers")}
    for step, *_ in runs.values():
        step()
    times = {w: [] for w in runs}
    for _ in range(steps):
        for w, (step, *_) in runs.items():
            t = time.perf_counter(); step(); times[w].append(time.perf_counter() - t)
    _, tokens, seq, described = runs["idefics3"]
    print(json.dumps({"tokens_per_s": {w: [tokens / t for t in ts] for w, ts in times.items()}, "seq_len": seq,
                      "device": torch.cuda.get_device_name() if cuda else "cpu", "backend": described}))
else:  # peak memory of one implementation's training step, in its own process
    step, *_ = build(mode)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:  # restart the peak-RSS counter so that loading's own peak does not count
        base = rss_mb()
        open("/proc/self/clear_refs", "w").write("5")
    step(); step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    print(json.dumps({"peak_mb": peak - base}))
"""

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="memory measurements per implementation")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per implementation (alternating)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--dir", default=str(BENCH_DIR / "smolvlm-256m"))
    args = ap.parse_args()
    folder = write_random_checkpoint(Path(args.dir))
    shape = [str(args.batch_size), str(args.text_tokens), str(args.answer_tokens)]
    speed = run_child(CHILD, "speed", str(folder), str(args.steps), *shape)
    memory: dict[str, list[float]] = {"idefics3": [], "transformers": []}
    for _ in range(args.repeats):
        for which in memory:
            memory[which].append(run_child(CHILD, which, str(folder), "1", *shape)["peak_mb"])
    print(f"SmolVLM-256M-shaped LoRA training step on {speed['device']}: batch {args.batch_size} x {speed['seq_len']} "
          f"tokens (one 512x512 frame = 64 image tokens per row, loss on {args.answer_tokens} tokens per row)")
    if speed["device"] == "cpu":
        print(machine_line())
    print("\n".join(backend_lines(speed["backend"], "idefics3 kernels (load_model, backend 'torch')")))
    names = {"idefics3": "idefics3", "transformers": "transformers+peft"}
    for which in memory:
        print(summary(f"{names[which]} tokens/s", speed["tokens_per_s"][which], "tok/s"))
        print(summary(f"{names[which]} peak memory", memory[which], "MiB"))
    ratio = [a / b for a, b in zip(speed["tokens_per_s"]["idefics3"], speed["tokens_per_s"]["transformers"])]
    print(f"throughput ratio idefics3 / transformers+peft: median {statistics.median(ratio):.2f}x over {len(ratio)} "
          f"alternating step pairs (range {min(ratio):.2f}-{max(ratio):.2f})")
    mem = {w: statistics.median(v) for w, v in memory.items()}
    print(f"peak memory ratio idefics3 / transformers+peft: {mem['idefics3'] / mem['transformers']:.2f}")


if __name__ == "__main__":
    main()
