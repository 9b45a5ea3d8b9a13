"""What a run leaves behind: the adapter or full checkpoint, processor files, metrics.jsonl and README.md.

metrics.jsonl gets one JSON object per optimiser step (step, epoch, loss, lr, tokens_per_s, time, and
eval_loss on evaluation steps). On resume the rows after the checkpoint's step are dropped first, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .lora import save_adapter

METRICS = "metrics.jsonl"


class MetricsLog:
    def __init__(self, folder: Path) -> None:
        self.path = folder / METRICS

    def truncate_after(self, step: int) -> None:
        """Keep only the rows of steps <= `step` (atomically)."""
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / METRICS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_card(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """A README.md for the output folder: what was trained on what, how, and how to load it."""
    lora = not config["full"]
    out = Path(config["output"]).name or "out"
    what = (f"a LoRA adapter (r={config['lora_r']}, alpha={config['lora_alpha']}, dropout={config['lora_dropout']}, "
            f"targets {config['lora_targets']})" if lora else "a full fine-tune")
    lines = [
        "---", f"base_model: {config['model']}", "library_name: " + ("peft" if lora else "idefics3"),
        "tags: [idefics3, smolvlm, fine-tuned]", "---", "",
        f"# {out}", "",
        f"This is {what} of `{config['model']}`, trained with `idefics3 finetune`.", "",
        "## Command", "", "```", config.get("command") or "(Python API)", "```", "",
        "## Data", "",
        f"- training data: `{config['data']}` ({summary['train_rows']} rows; {summary['bad_rows']})",
    ]
    if config.get("eval_data"):
        lines.append(f"- evaluation data: `{config['eval_data']}`")
    lines += [f"- loss on: {config['loss_on']} tokens", "", "## Training", "",
              f"- steps: {summary['steps']} (batch {config['batch_size']} x accumulation {config['grad_accum']} x "
              f"{summary['world_size']} process(es)), epochs seen: {summary['epochs']:.2f}",
              f"- optimiser: AdamW, lr {config['lr']}, warmup {summary.get('warmup_steps', config['warmup'])} steps, "
              f"{config['schedule']} decay, weight decay {config['weight_decay']}, clip {config['max_grad_norm']}",
              f"- frozen parts: {', '.join(config['freeze']) or 'none'}; dtype {summary['dtype']}; "
              f"seed {config['seed']}",
              f"- final training loss: {summary['final_loss']}" +
              (f"; final eval loss: {summary['eval_loss']}" if summary.get("eval_loss") is not None else ""),
              "", "## Use", ""]
    if lora:
        lines += ["```python", "from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor",
                  "from idefics3.finetune import load_adapter, merge_lora", "",
                  f"model = Idefics3ForConditionalGeneration.from_pretrained({config['model']!r})",
                  f"load_adapter(model, '{out}/adapter')  # or: merge_lora(model) after it",
                  f"processor = Idefics3Processor.from_pretrained('{out}')", "```", "",
                  f"With transformers + peft: `PeftModel.from_pretrained(base_model, '{out}/adapter')`. To write a "
                  f"plain checkpoint: `idefics3 merge --model {config['model']} --adapter {out}/adapter "
                  f"--output merged/`."]
    else:
        lines += ["```python", "from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor", "",
                  f"model = Idefics3ForConditionalGeneration.from_pretrained('{out}')",
                  f"processor = Idefics3Processor.from_pretrained('{out}')", "```"]
    lines += ["", "Metrics per step are in `metrics.jsonl`.", ""]
    return "\n".join(lines)


def write_outputs(config: Any, model: torch.nn.Module, sharded: bool, processor: Any,
                  trainable: dict[str, torch.Tensor], summary: dict[str, Any], saved_dtype: torch.dtype) -> None:
    """Write the trained result into config.output (rank 0), from the gathered `trainable` tensors. A sharded
    model cannot save itself: a full checkpoint is then rebuilt from the base model plus those tensors."""
    out = Path(config.output)
    if not config.full:
        save_adapter(model, out / "adapter", config.lora_settings(), config.model, tensors=trainable)
    else:
        if sharded:
            from ..model.idefics3 import Idefics3

            model = Idefics3.from_pretrained(config.model, dtype=torch.float32)
            model.load_state_dict(trainable, strict=False)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(saved_dtype)
        model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(model_card(config.to_dict(), summary), encoding="utf-8")

