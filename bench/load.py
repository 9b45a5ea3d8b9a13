"""Time and peak memory to load a SmolVLM-256M-shaped checkpoint: idefics3 against transformers.

Each load runs in a fresh process (so peak resident memory is that load's own), alternating A B A B.
idefics3 loads as users load it, `idefics3.load_model(folder, dtype="bf16", device="cpu", backend=...)`: the
weights, then the kernel backend (--backend auto, the default, chooses and installs our CPU kernels; torch
installs nothing). Peak RSS (VmHWM, every weight touched) is reported in total and above the RSS after imports,
with the CPU and its ISA, which implementation each op got (`model.backend.describe()`) and the memory of the
backend's derived weights at load (`backend.nbytes()`). Usage:
    python bench/load.py [--repeats 5] [--backend auto] [--dir /tmp/idefics3-bench/smolvlm-256m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BENCH_DIR, backend_lines, machine_line, run_child, summary, write_random_checkpoint  # noqa: E402

CHILD = r"""
import json, sys, time, torch
which, folder, backend = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "idefics3":
    from idefics3 import load_model  # imports the model's modules now, before the base RSS
    load = lambda: load_model(folder, dtype="bf16", device="cpu", backend=backend)
else:
    from transformers import Idefics3ForConditionalGeneration as M
    load = lambda: M.from_pretrained(folder, dtype=torch.bfloat16)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss_mb()
t = time.perf_counter()
model = load()
s = sum(float(p.sum()) for p in model.parameters())  # touch every weight: lazily mapped pages count too
elapsed = time.perf_counter() - t
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
out = {"seconds": elapsed, "peak_mb": peak, "above_imports_mb": peak - base}
if which == "idefics3":
    out["backend"] = model.backend.describe()
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", choices=["auto", "torch"], default="auto", help="idefics3's kernel backend")
    ap.add_argument("--dir", default=str(BENCH_DIR / "smolvlm-256m"))
    args = ap.parse_args()
    folder = write_random_checkpoint(Path(args.dir))
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"checkpoint: {folder} ({size_mb:.0f} MiB of safetensors, bf16)")
    results: dict[str, list[dict]] = {"idefics3": [], "transformers": []}
    for _ in range(args.repeats):
        for which in results:
            results[which].append(run_child(CHILD, which, str(folder), args.backend))
    print(machine_line())
    print("\n".join(backend_lines(results["idefics3"][0]["backend"], f"idefics3 kernels (backend {args.backend!r})")))
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
