"""QLoRA: fine-tuning adapters over a frozen int4 base (`finetune --quantize int4`), and merging them into a
full-precision checkpoint that gives the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch

from idefics3 import Idefics3ForConditionalGeneration
from idefics3.finetune import finetune
from idefics3.finetune.lora import LoRALinear, LoraSettings, inject_lora, load_adapter, lora_modules, save_adapter
from idefics3.finetune.merge import merge_adapter
from idefics3.quant import QuantLinear


def load(folder, **kw):
    return Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, backend="torch", **kw)


def test_qlora_trains_adapters_only_and_leaves_the_int4_base_untouched(tmp_path, tiny_checkpoint, colour_task):
    from idefics3.finetune import setup

    result = finetune(model=str(tiny_checkpoint), data=str(colour_task[0]), output=str(tmp_path), quantize="int4",
                      max_steps=6, batch_size=4, lr=5e-3, warmup=1, lora_r=4, no_split=True, seed=0,
                      schedule="constant")
    assert result.steps == 6 and result.final_loss is not None
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 4
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # the base the run trained on: quantised while loading, every matrix frozen in its format
    config = setup.FinetuneConfig(model=str(tiny_checkpoint), data="x", output="y", quantize="int4")
    model = setup.prepare_model(config, torch.device("cpu"), setup.precision(config, torch.device("cpu")))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and any(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_a_quantised_base_refuses_full_training_and_bad_formats(tiny_checkpoint):
    with pytest.raises(ValueError, match="LoRA adapters"):
        finetune(model=str(tiny_checkpoint), data="unused.jsonl", output="unused", quantize="int4", full=True)
    with pytest.raises(ValueError, match="unknown quantisation 'int5'"):
        finetune(model=str(tiny_checkpoint), data="unused.jsonl", output="unused", quantize="int5")


def test_merging_into_a_quantised_folder_gives_full_precision_with_the_trained_logits(tmp_path, tiny_checkpoint,
                                                                                     inputs):
    load(tiny_checkpoint, quantize="int4").save_pretrained(tmp_path / "int4")
    model = load(tmp_path / "int4")
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets="all-linear")
    names = inject_lora(model, settings)
    assert any(isinstance(model.get_submodule(n).base_layer, QuantLinear) for n in names)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.05)
        expected = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter", settings)
    merged = merge_adapter(tmp_path / "int4", tmp_path / "adapter", tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    dense = load(merged)
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    # and the adapter loads back onto the quantised base with the same result
    again = load(tmp_path / "int4")
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
