"""Time and peak memory to load a SmolVLM-256M-shaped checkpoint: idefics3 against transformers.

Each load runs in a fresh process (so peak resident memory is that load's own), alternating A B A B.
Peak RSS (VmHWM, every weight touched) is reported in total and above the RSS after imports. Usage:
    python bench/load.py [--repeats 5] [--dir /tmp/idefics3-bench]
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
which, folder = sys.argv[1], sys.argv[2]
if which == "idefics3":
    from idefics3 import Idefics3ForConditionalGeneration as M
else:
    from transformers import Idefics3ForConditionalGeneration as M
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mb()
t = time.perf_counter()
model = M.from_pretrained(folder, dtype=torch.bfloat16)
s = sum(float(p.sum()) for p in model.parameters())  # touch every weight: lazily mapped pages count too
elapsed = time.perf_counter() - t
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
print(json.dumps({"seconds": elapsed, "peak_mb": peak, "above_imports_mb": peak - base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/idefics3-bench/smolvlm-256m")
    args = ap.parse_args()
    folder = write_random_checkpoint(Path(args.dir))
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"checkpoint: {folder} ({size_mb:.0f} MiB of safetensors, bf16)")
    results: dict[str, list[dict]] = {"idefics3": [], "transformers": []}
    for _ in range(args.repeats):
        for which in results:
            results[which].append(run_child(CHILD, which, str(folder)))
    for which, rows in results.items():
        print(summary(f"{which} load time", [r["seconds"] for r in rows], "s"))
        print(summary(f"{which} peak RSS", [r["peak_mb"] for r in rows], "MiB"))
        print(summary(f"{which} RSS above imports", [r["above_imports_mb"] for r in rows], "MiB"))
    med = {w: statistics.median(r["seconds"] for r in rows) for w, rows in results.items()}
    mem = {w: statistics.median(r["above_imports_mb"] for r in rows) for w, rows in results.items()}
    print(f"load time ratio transformers/idefics3: {med['transformers'] / med['idefics3']:.2f}x")
    print(f"memory above imports ratio idefics3/transformers: {mem['idefics3'] / mem['transformers']:.2f} "
          f"(weights on disk: {size_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
