"""The same command under torchrun trains data-parallel (gloo on CPU) and matches one process with the same
global batch: DDP, and FSDP2 sharding, with only rank 0 writing files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from idefics3.finetune import finetune
from idefics3.finetune.report import read_metrics

STEPS = dict(max_steps=3, lr=3e-3, warmup=1, lora_r=4, lora_dropout=0.0, no_split=True, seed=1)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_checkpoint, colour_task):
    out = tmp_path_factory.mktemp("single")
    finetune(model=str(tiny_checkpoint), data=str(colour_task[0]), output=str(out), batch_size=2, grad_accum=2,
             **STEPS)
    return out


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_checkpoint, colour_task, single_process, mode):
    args = ["--model", str(tiny_checkpoint), "--data", str(colour_task[0]), "--output", str(tmp_path),
            "--batch-size", "1", "--grad-accum", "2", "--max-steps", "3", "--lr", "3e-3", "--warmup", "1",
            "--lora-r", "4", "--lora-dropout", "0", "--no-split", "--seed", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "idefics3.finetune",
                           "finetune", *args, *(["--fsdp"] if mode == "fsdp" else [])],
                          env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, reference = read_metrics(tmp_path), read_metrics(single_process)
    assert [r["step"] for r in ours] == [1, 2, 3]  # one writer: no duplicated rows
    for a, b in zip(ours, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(single_process / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == expected.keys()
    for key, value in expected.items():
        assert (adapter[key] - value).abs().max() < 1e-5, key


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_fsdp_with_text_only_rows_on_one_rank(tmp_path, tiny_checkpoint, colour_task):
    """Sharded layers all-gather in every forward, so a rank whose batch has no image must still run the vision
    tower; without that the ranks would wait on each other forever."""
    rows = colour_task[0].read_text().splitlines()[:4]
    text_only = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Say red."}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]})
    mixed = [line for row in rows for line in (row, text_only)]  # image rows at even slots: rank 0 only
    data = colour_task[0].parent / "mixed.jsonl"
    data.write_text("\n".join(mixed) + "\n")
    options = dict(max_steps=2, lr=3e-3, warmup=1, lora_r=4, lora_dropout=0.0, no_split=True, shuffle=False)
    finetune(model=str(tiny_checkpoint), data=str(data), output=str(tmp_path / "single"), batch_size=2, **options)
    args = ["--model", str(tiny_checkpoint), "--data", str(data), "--output", str(tmp_path / "fsdp"), "--fsdp",
            "--batch-size", "1", "--max-steps", "2", "--lr", "3e-3", "--warmup", "1", "--lora-r", "4",
            "--lora-dropout", "0", "--no-split", "--no-shuffle", "--device", "cpu"]
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "idefics3.finetune",
                           "finetune", *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "single")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
