"""Options, schedule and progress output: small pure pieces of the fine-tuning command."""

from __future__ import annotations

import io
import math

import pytest

from idefics3.finetune.cli import ProgressBar
from idefics3.finetune.config import FinetuneConfig
from idefics3.finetune.schedule import lr_at, warmup_steps
from idefics3.finetune.train import StepInfo


def config(**options):
    return FinetuneConfig(model="m", data="d.jsonl", output="out", **options)


def test_schedule_warms_up_then_decays_to_zero():
    assert [lr_at(s, 1.0, 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 1.0, 4, 10) == 1.0 and lr_at(10, 1.0, 4, 10) == pytest.approx(0.0)
    assert lr_at(7, 1.0, 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(7, 1.0, 4, 10, "linear") == pytest.approx(0.5)
    assert lr_at(9, 1.0, 4, 10, "constant") == 1.0


def test_warmup_is_a_fraction_of_the_run_and_always_shorter_than_it():
    assert [warmup_steps(n) for n in (1, 2, 10, 20, 40, 60, 1000, 10_000)] == [0, 1, 1, 1, 2, 3, 50, 500]
    assert warmup_steps(100, ratio=0.1) == 10 and warmup_steps(100, ratio=0.0) == 0
    assert warmup_steps(1000, warmup=50) == 50 and warmup_steps(1000, warmup=0) == 0  # steps override the ratio
    assert warmup_steps(40, warmup=50) == 39 and warmup_steps(5, ratio=1.0) == 4 and warmup_steps(1, warmup=9) == 0
    # whatever the length, ratio or steps asked for, some step runs at the peak learning rate
    for total in (1, 2, 3, 5, 10, 40, 41, 333):
        for options in (dict(), dict(ratio=0.5), dict(ratio=1.0), dict(warmup=50), dict(warmup=total - 1)):
            w = warmup_steps(total, **options)
            for kind in ("cosine", "linear", "constant"):
                lrs = [lr_at(s, 3e-3, w, total, kind) for s in range(total)]
                assert max(lrs) == 3e-3, (total, options, kind)
                assert lrs[:w] == sorted(lrs[:w]) and lrs.index(3e-3) == max(0, w - 1)


def test_the_40_step_run_of_the_issue_reaches_its_learning_rate_early():
    lrs = [lr_at(s, 3e-3, config().warmup_steps(40), 40) for s in range(40)]
    assert lrs[:3] == [1.5e-3, 3e-3, 3e-3] and lrs[-1] < 1e-4  # 50 fixed warm-up steps never got past 2.4e-3
    assert config(warmup=10).warmup_steps(40) == 10 and config(warmup_ratio=0.25).warmup_steps(40) == 10


def test_options_are_parsed_and_checked():
    assert config(lora_targets="q_proj, v_proj").lora_targets == ["q_proj", "v_proj"]
    assert config(lora_targets=r".*text_model.*\.q_proj").lora_targets == r".*text_model.*\.q_proj"  # a regex
    assert config(freeze="vision,connector").freeze == ["vision", "connector"]
    assert config().lora_settings().scaling == 2.0
    for bad, message in [(dict(freeze=["eyes"]), "--freeze"), (dict(loss_on="user"), "loss_on"),
                         (dict(full=True, freeze=["vision", "connector", "text"]), "nothing to train"),
                         (dict(lora_r=0), "rank"), (dict(batch_size=0), "batch size"), (dict(dtype="fp8"), "dtype"),
                         (dict(warmup=-1), "warmup"), (dict(warmup_ratio=1.5), "warmup_ratio")]:
        with pytest.raises(ValueError, match=message):
            config(**bad)


def test_building_the_parsers_imports_no_torch_and_one_list_of_targets_serves():
    import subprocess
    import sys

    code = ("import sys, idefics3.cli as c; from idefics3.finetune.cli import DEFAULT_TARGETS; "
            "args = c.build_parser().parse_args(['finetune', '--model', 'm', '--data', 'd', '--output', 'o']); "
            "print('torch' in sys.modules, args.warmup, args.warmup_ratio, list(args.lora_targets) == "
            "list(DEFAULT_TARGETS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "None", "0.05", "True"]
    from idefics3.finetune import cli, config, lora, parts

    assert cli.DEFAULT_TARGETS is config.DEFAULT_TARGETS is lora.DEFAULT_TARGETS is parts.DEFAULT_TARGETS
    assert cli.PARTS is config.PARTS is lora.PARTS is parts.PARTS
    assert FinetuneConfig.__dataclass_fields__["warmup_ratio"].default == 0.05


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
