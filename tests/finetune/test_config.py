"""Options, schedule and progress output: small pure pieces of the fine-tuning command."""

from __future__ import annotations

import io
import math

import pytest

from idefics3.finetune.cli import ProgressBar
from idefics3.finetune.config import FinetuneConfig
from idefics3.finetune.schedule import lr_at
from idefics3.finetune.train import StepInfo


def config(**options):
    return FinetuneConfig(model="m", data="d.jsonl", output="out", **options)


def test_schedule_warms_up_then_decays_to_zero():
    assert [lr_at(s, 1.0, 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 1.0, 4, 10) == 1.0 and lr_at(10, 1.0, 4, 10) == pytest.approx(0.0)
    assert lr_at(7, 1.0, 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(7, 1.0, 4, 10, "linear") == pytest.approx(0.5)
    assert lr_at(9, 1.0, 4, 10, "constant") == 1.0


def test_options_are_parsed_and_checked():
    assert config(lora_targets="q_proj, v_proj").lora_targets == ["q_proj", "v_proj"]
    assert config(lora_targets=r".*text_model.*\.q_proj").lora_targets == r".*text_model.*\.q_proj"  # a regex
    assert config(freeze="vision,connector").freeze == ["vision", "connector"]
    assert config().lora_settings().scaling == 2.0
    for bad, message in [(dict(freeze=["eyes"]), "--freeze"), (dict(loss_on="user"), "loss_on"),
                         (dict(full=True, freeze=["vision", "connector", "text"]), "nothing to train"),
                         (dict(lora_r=0), "rank"), (dict(batch_size=0), "batch size"), (dict(dtype="fp8"), "dtype")]:
        with pytest.raises(ValueError, match=message):
            config(**bad)


def test_building_the_parsers_imports_no_torch_and_one_list_of_targets_serves():
    import subprocess
    import sys

    code = ("import sys, idefics3.cli as c; from idefics3.finetune.cli import DEFAULT_TARGETS; "
            "args = c.build_parser().parse_args(['finetune', '--model', 'm', '--data', 'd', '--output', 'o']); "
            "print('torch' in sys.modules, list(args.lora_targets) == list(DEFAULT_TARGETS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    from idefics3.finetune import cli, config, lora, parts

    assert cli.DEFAULT_TARGETS is config.DEFAULT_TARGETS is lora.DEFAULT_TARGETS is parts.DEFAULT_TARGETS
    assert cli.PARTS is config.PARTS is lora.PARTS is parts.PARTS


def test_progress_bar_shows_loss_lr_throughput_and_eta():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(StepInfo(step=1, total_steps=4, loss=2.5, lr=1e-4, tokens_per_s=1234.0, elapsed=1.0, eta=75.0, epoch=0.1,
                 grad_norm=1.0))
    bar(StepInfo(step=4, total_steps=4, loss=1.25, lr=0.0, tokens_per_s=1000.0, elapsed=4.0, eta=0.0, epoch=0.4,
                 grad_norm=1.0, eval_loss=1.5))
    first, last = stream.getvalue().splitlines()
    assert "step 1/4" in first and "loss 2.5000" in first and "lr 1.00e-04" in first and "1,234 tok/s" in first
    assert "ETA 1m15s" in first and "eval_loss 1.5000" in last and "[" + "#" * 24 + "]" in last
