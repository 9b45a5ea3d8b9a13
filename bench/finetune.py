"""LoRA training throughput and peak memory on a SmolVLM-256M-shaped model: idefics3 against transformers + peft.

Both sides run the same LoRA step (r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down of every tower, AdamW,
clipping at 1.0) on the same synthetic batch: one 512x512 image per sample (one frame, 64 image tokens), text
around it, and the loss on a short assistant answer. idefics3 uses its fine-tuning objective (output head only
on labelled positions); transformers + peft computes logits everywhere, as its Trainer does. Each measurement is
a fresh process, alternating A B A B; we report medians and ratios. GPU: bf16 autocast with bf16 base weights,
peak `torch.cuda.max_memory_allocated`; CPU: float32, peak resident memory above the RSS after loading. Usage:
    python bench/finetune.py [--repeats 3] [--steps 5] [--batch-size 2] [--text-tokens 256] [--dir /tmp/...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import run_child, summary, write_random_checkpoint  # noqa: E402

CHILD = r"""
import json, sys, time, torch
which, folder, steps, batch_size, text_tokens, answer = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
dtype = torch.bfloat16 if cuda else torch.float32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def peak_rss_mb():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024

torch.manual_seed(0)
if which == "idefics3":
    from idefics3 import Idefics3ForConditionalGeneration
    from idefics3.finetune.lora import LoraSettings, inject_lora, mark_only_lora_trainable
    from idefics3.finetune.objective import TokenLoss
    model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device)
    inject_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, targets=TARGETS))
    mark_only_lora_trainable(model)
    loss_fn = TokenLoss(model)
    def step_loss(batch):
        n = int((batch["labels"][:, 1:] != -100).sum())
        return loss_fn(**batch) / n
    config = model.config
    image_token, image_seq = config.image_token_id, config.image_seq_len
else:
    import warnings; warnings.simplefilter("ignore")
    from transformers import Idefics3ForConditionalGeneration
    from peft import LoraConfig, get_peft_model
    model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    def step_loss(batch):
        return model(**batch).loss
    config = model.config
    image_token = config.image_token_id
    v = config.vision_config
    image_seq = (v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2
model.train()
base_rss = rss_mb()
if not cuda:  # restart the peak-RSS counter so that loading's own peak does not count
    open("/proc/self/clear_refs", "w").write("5")
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

# The batch: [BOS] text [F G I*S F] text answer, right-padded to the same length (all rows equal here).
g = torch.Generator().manual_seed(0)
half = text_tokens // 2
rows = []
for _ in range(batch_size):
    text = lambda n: torch.randint(100, 40000, (n,), generator=g)
    ids = torch.cat([torch.tensor([1]), text(half), torch.tensor([49189, 49152]), torch.full((image_seq,), image_token),
                     torch.tensor([49189]), text(text_tokens - half), text(answer)])
    rows.append(ids)
input_ids = torch.stack(rows).to(device)
labels = torch.full_like(input_ids, -100)
labels[:, -answer:] = input_ids[:, -answer:]
size = config.vision_config.image_size
batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
         "pixel_values": torch.randn(batch_size, 1, 3, size, size, generator=g).to(device),
         "pixel_attention_mask": torch.ones(batch_size, 1, size, size, dtype=torch.long).to(device)}

def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = step_loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

for _ in range(2):
    step()
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
losses = [step() for _ in range(steps)]
if cuda:
    torch.cuda.synchronize()
elapsed = time.perf_counter() - t
tokens = int(batch["attention_mask"].sum()) * steps
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb() - base_rss
print(json.dumps({"tokens_per_s": tokens / elapsed, "step_s": elapsed / steps, "peak_mb": peak,
                  "seq_len": input_ids.shape[1], "loss": losses[-1], "device": str(device)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--dir", default="/tmp/idefics3-bench/smolvlm-256m")
    args = ap.parse_args()
    folder = write_random_checkpoint(Path(args.dir))
    child_args = [str(args.steps), str(args.batch_size), str(args.text_tokens), str(args.answer_tokens)]
    results: dict[str, list[dict]] = {"idefics3": [], "transformers+peft": []}
    for _ in range(args.repeats):
        for which in results:
            results[which].append(run_child(CHILD, which.split("+")[0], str(folder), *child_args))
    first = results["idefics3"][0]
    print(f"SmolVLM-256M-shaped LoRA step on {first['device']}: batch {args.batch_size} x {first['seq_len']} tokens "
          f"(64 image tokens, loss on {args.answer_tokens}), {args.steps} timed steps per process")
    for which, rows in results.items():
        print(summary(f"{which} tokens/s", [r["tokens_per_s"] for r in rows], "tok/s"))
        print(summary(f"{which} peak memory", [r["peak_mb"] for r in rows], "MiB"))
    speed = {w: statistics.median(r["tokens_per_s"] for r in rows) for w, rows in results.items()}
    memory = {w: statistics.median(r["peak_mb"] for r in rows) for w, rows in results.items()}
    print(f"throughput ratio idefics3 / transformers+peft: {speed['idefics3'] / speed['transformers+peft']:.2f}x")
    print(f"peak memory ratio idefics3 / transformers+peft: {memory['idefics3'] / memory['transformers+peft']:.2f}")


if __name__ == "__main__":
    main()
