"""The training loop: it learns, reports eval loss, writes its outputs, and loses nothing to kills or Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from finetune.finetune_data import colour_row, write_colour_task
from idefics3 import Idefics3ForConditionalGeneration
from idefics3.finetune import checkpoint as ckpt
from idefics3.finetune import finetune, recompute
from idefics3.finetune.collate import collate
from idefics3.finetune.data import open_source
from idefics3.finetune.encode import ConversationEncoder
from idefics3.finetune.objective import TokenLoss
from idefics3.finetune.report import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
# One LoRA run, used uninterrupted, killed, resumed; dropout on so that restoring the RNG matters.
RUN = dict(max_steps=8, save_every=2, batch_size=2, lr=3e-3, warmup=2, lora_r=4, lora_dropout=0.1, no_split=True,
           seed=3)


def cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def test_loss_halves_on_a_small_task_and_outputs_are_complete(tmp_path, tiny_checkpoint, colour_task):
    train, evaluation = colour_task
    result = finetune(model=str(tiny_checkpoint), data=str(train), eval_data=str(evaluation), output=str(tmp_path),
                      full=True, freeze=["vision"], max_steps=10, batch_size=4, lr=1e-2, warmup=1,
                      schedule="constant", no_split=True, eval_every=5)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert min(r["loss"] for r in rows[-3:]) <= rows[0]["loss"] / 2
    assert {"loss", "lr", "tokens_per_s", "time", "epoch", "grad_norm"} <= set(rows[0])
    assert "eval_loss" in rows[4] and "eval_loss" in rows[9] and "eval_loss" not in rows[5]
    assert result.eval_loss == rows[9]["eval_loss"] < rows[4]["eval_loss"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"):
        assert (tmp_path / name).is_file(), name
    card = (tmp_path / "README.md").read_text()
    assert "idefics3 finetune" in card or "Python API" in card
    trained = Idefics3ForConditionalGeneration.from_pretrained(tmp_path)
    base = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert torch.equal(trained.model.vision_model.post_layernorm.weight, base.model.vision_model.post_layernorm.weight)
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)


KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(2)
    from idefics3.finetune import finetune
    def progress(info):
        if info.step == 5:  # step 5 is done but not checkpointed: its work must be redone after resume
            os.kill(os.getpid(), signal.SIGKILL)
    finetune(model=sys.argv[1], data=sys.argv[2], output=sys.argv[3], progress=progress, **eval(sys.argv[4]))
""")


def test_kill_and_resume_gives_identical_losses_and_a_damaged_checkpoint_is_skipped(tmp_path, tiny_checkpoint,
                                                                                     colour_task):
    train, _ = colour_task
    reference = tmp_path / "reference"
    # the uninterrupted run in a process of its own too, so that it has the threads the killed and resumed runs
    # have (the pytest process's may have been changed by an earlier test: fp32 sums then differ in the last bit)
    uninterrupted = subprocess.run([sys.executable, "-m", "idefics3.finetune", "finetune", "--model",
                                    str(tiny_checkpoint), "--data", str(train), "--output", str(reference),
                                    *cli_args(RUN)], env=ENV, capture_output=True, text=True, timeout=180)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = {r["step"]: r["loss"] for r in read_metrics(reference)}

    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(tiny_checkpoint), str(train), str(out), repr(RUN)],
                            env=ENV, capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in ckpt.all_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert len(read_metrics(out)) == 5
    (out / "checkpoints" / ".tmp-step-00000006-1").mkdir()  # debris of a save cut short is ignored

    resumed = subprocess.run([sys.executable, "-m", "idefics3.finetune", "finetune", "--model", str(tiny_checkpoint),
                              "--data", str(train), "--output", str(out), "--resume", *cli_args(RUN)],
                             env=ENV, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 4" in resumed.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # the lost step 5 row was replaced, not duplicated
    assert {r["step"]: r["loss"] for r in rows} == expected
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # Damage the newest checkpoint: resuming falls back to the one before and still reproduces the run.
    newest = ckpt.all_checkpoints(out / "checkpoints")[-1]
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    assert "checksum" in ckpt.verify(newest)
    assert ckpt.latest_valid(out / "checkpoints").step == 6
    result = finetune(model=str(tiny_checkpoint), data=str(train), output=str(out), resume=True, **RUN)
    assert result.resumed_from == 6
    assert {r["step"]: r["loss"] for r in read_metrics(out)} == expected


def test_a_40_step_run_reaches_the_learning_rate_asked_for(tmp_path, tiny_checkpoint, colour_task, capsys):
    """A 40-step run: `idefics3 finetune ... --max-steps 40 --lr 3e-3` with the default warm-up (5%: 2 steps),
    where a fixed 50-step warm-up never got past 2.4e-3."""
    from idefics3.cli import main

    assert main(["finetune", "--model", str(tiny_checkpoint), "--data", str(colour_task[0]), "--output",
                 str(tmp_path), "--max-steps", "40", "--lr", "3e-3", "--lora-r", "2", "--no-split"]) == 0
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    assert len(lrs) == 40 and max(lrs) == 3e-3 and lrs[:3] == [1.5e-3, 3e-3, 3e-3] and lrs[-1] < 1e-4
    assert "lr 0.003, warmup 2 steps, cosine decay" in (tmp_path / "README.md").read_text()
    assert "done: 40 steps" in capsys.readouterr().out


def test_one_bad_row_in_a_two_epoch_run_is_reported_once(tmp_path, tiny_checkpoint, capsys, caplog):
    from idefics3.cli import main

    write_colour_task(tmp_path, 3)
    rows = (tmp_path / "train.jsonl").read_text().splitlines() + [json.dumps(colour_row("images/gone.png", "red"))]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        assert main(["finetune", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "data.jsonl"),
                     "--output", str(tmp_path / "out"), "--epochs", "2", "--lora-r", "2", "--no-split"]) == 0
    assert len(read_metrics(tmp_path / "out")) == 8  # 2 epochs of 4 rows: 8 good rows, so the bad row is met 2-3 times
    assert "skipped 1 bad row(s): missing image 1" in capsys.readouterr().err
    assert "(4 rows; 1 bad row skipped (missing image: 1))" in (tmp_path / "out" / "README.md").read_text()
    assert sum("skipping bad row" in r.getMessage() for r in caplog.records) == 1


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path, tiny_checkpoint, colour_task):
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(model=str(tiny_checkpoint), data=str(colour_task[0]), output=str(tmp_path))


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_checkpoint, colour_task):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "idefics3.finetune", "finetune", "--model", str(tiny_checkpoint),
                             "--data", str(colour_task[0]), "--output", str(out), "--max-steps", "1000",
                             "--dtype", "bf16", "--gradient-checkpointing", "--no-split", "--lora-r", "2"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").is_file() and
                                               len(read_metrics(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr
    found = ckpt.latest_valid(out / "checkpoints")
    assert found is not None and found.step == read_metrics(out)[-1]["step"] >= 2
    assert all(r["loss"] == r["loss"] and r["loss"] < 20 for r in read_metrics(out))  # finite under bf16


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint, processor, colour_task):
    encoder = ConversationEncoder(processor)
    source = open_source(colour_task[0])
    batch = collate([encoder(source.read(i)) for i in range(3)], processor.tokenizer.pad_token_id)
    results = []
    for recompute_on in (False, True):
        model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint).train()
        if recompute_on:
            record = recompute.enable(model)
            assert all(isinstance(layer, recompute.Recomputed) for layer in recompute.checkpointed_layers(model))
        loss = TokenLoss(model)(**batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        if recompute_on:
            recompute.disable(record)
            assert not any(isinstance(layer, recompute.Recomputed) for layer in recompute.checkpointed_layers(model))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6)
