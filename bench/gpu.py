"""GPU comparison: an Idefics3-8B-shaped model in bf16 on one CUDA device, idefics3 against transformers.

The script builds the 8B configuration with random bf16 weights directly on the device (ours, then
`install_backend(ours, "auto")` as `from_pretrained` would: on CUDA every op takes the plain PyTorch path,
and the script prints `describe()` saying so; transformers' model gets the very same tensors through
load_state_dict), one photo-like 1024x768 image at the default resolution (364-px tiles, longest edge 1456:
4x3 tiles + global = 13 frames, 2197 image tokens), a short question and 64 new tokens greedy (forced),
alternating A B A B. Printed: the device, which implementation ran each op, time to first token
(preprocessing included), decode tokens/s at batch 1 against the HBM bandwidth limit (text weight bytes per
token / device copy bandwidth measured on the spot), and peak memory. It needs about 35 GB of device memory
and finishes in a few minutes on one H100. The processor files are the SmolVLM tokenizer vendored in
tests/data (with the 8B tile settings); the config's image token is pointed at that tokenizer's <image> id.
TTFT and decode are timed token by token, so this calls `generate` with a per-token callback rather than
`idefics3.ask`. Usage: python bench/gpu.py [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from common import backend_lines, decode_bytes_per_token  # noqa: E402


def photo():
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in range(3)], -1)
    img += np.random.default_rng(0).normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def copy_bandwidth(device: str) -> float:
    src = torch.ones(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return (2 << 30) / best  # bytes copied per second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    device = "cuda"
    from transformers import AutoProcessor
    from transformers import Idefics3Config as HFConfig
    from transformers import Idefics3ForConditionalGeneration as HFModel

    from checkpoints import write_processor_files
    from idefics3 import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, install_backend
    from idefics3.presets import preset

    raw = preset("Idefics3-8B-Llama3")
    raw["image_token_id"] = 49190
    folder = Path(tempfile.mkdtemp())
    write_processor_files(folder, tile=364, longest_edge=1456, image_seq_len=169)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [49279], "pad_token_id": 2}))
    torch.manual_seed(0)
    with torch.device(device):
        ours = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(raw)).to(torch.bfloat16)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    ours.checkpoint_dir = folder  # generate reads generation_config.json (eos, pad) there
    ours.eval()
    ours.backend = install_backend(ours, "auto")  # what from_pretrained / load_model install: nothing on CUDA
    weights_gb = sum(p.numel() * 2 for p in ours.parameters()) / 1e9
    with torch.device(device):
        theirs = HFModel(HFConfig(**raw)).to(torch.bfloat16)
    theirs.load_state_dict(ours.state_dict())
    theirs.config._attn_implementation = "sdpa"
    theirs.eval()
    our_proc = Idefics3Processor.from_pretrained(folder)
    their_proc = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this photo?"}]}]
    image = photo()
    n = args.new_tokens

    def run(which: str) -> tuple[float, float]:
        proc, model = (our_proc, ours) if which == "idefics3" else (their_proc, theirs)
        times: list[float] = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = {k: v.to(device) for k, v in proc(text=prompt, images=[image], return_tensors="pt").items()}
        if which == "idefics3":
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, encoder_cache=False,
                           callback=lambda row, tok: times.append(time.perf_counter()))
        else:
            class Clock:
                def put(self, v):
                    times.append(time.perf_counter())

                def end(self):
                    pass
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Clock())
            times.pop(0)  # the prompt
        return times[0] - t0, (n - 1) / (times[-1] - times[0])

    bandwidth = copy_bandwidth(device)
    results: dict[str, list[tuple[float, float]]] = {"idefics3": [], "transformers": []}
    peaks: dict[str, float] = {}
    with torch.inference_mode():
        for which in results:
            run(which)  # warm-up
        for _ in range(args.rounds):
            for which in results:
                torch.cuda.reset_peak_memory_stats()
                results[which].append(run(which))
                peaks[which] = torch.cuda.max_memory_allocated() / 2**30
    text_bytes = decode_bytes_per_token(ours.config)
    limit = bandwidth / text_bytes
    print(f"device: {torch.cuda.get_device_name()}, weights {weights_gb:.1f} GB bf16, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s, decode limit {limit:.0f} tok/s ({text_bytes / 1e9:.1f} GB per token)")
    print("\n".join(backend_lines(ours.backend, "idefics3 kernels")))
    for which, rows in results.items():
        ttft = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[1] for r in rows)
        print(f"{which:<14} TTFT {ttft:7.3f} s   decode {tps:7.1f} tok/s = {tps / limit:5.0%} of the limit   "
              f"peak {peaks[which]:.1f} GiB (both models resident)")
    ours_t = statistics.median(r[0] for r in results["idefics3"])
    theirs_t = statistics.median(r[0] for r in results["transformers"])
    ours_d = statistics.median(r[1] for r in results["idefics3"])
    theirs_d = statistics.median(r[1] for r in results["transformers"])
    print(f"TTFT {theirs_t / ours_t:.2f}x faster, decode {ours_d / theirs_d:.2f}x transformers")


if __name__ == "__main__":
    main()
