"""LoRA by composition: identity at step 0, merge == unmerged, and PEFT/transformers interoperability both ways."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from idefics3 import Idefics3ForConditionalGeneration
from idefics3.finetune.lora import (
    LoRALinear,
    LoraSettings,
    inject_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)


def ours(tiny_checkpoint):
    """The plain path: LoRA injected after fused kernels would compare fused (before) with plain (after)."""
    return Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                            backend="torch").eval()


def hf_model(folder):
    from transformers import Idefics3ForConditionalGeneration as HF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HF.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def randomise_adapters(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.05)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def test_step_zero_equals_the_base_model(tiny_checkpoint, inputs):
    model = ours(tiny_checkpoint)
    before = logits(model, inputs)
    names = inject_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    assert "lm_head" not in names and any("vision_model" in n for n in names) and any("connector" in n for n in names)
    model.eval()
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)


def test_merged_equals_unmerged(tiny_checkpoint, inputs):
    model = ours(tiny_checkpoint)
    inject_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
    randomise_adapters(model)
    unmerged = logits(model, inputs)
    assert not torch.allclose(unmerged, logits(ours(tiny_checkpoint), inputs), atol=1e-3)  # the adapter matters
    merge_lora(model)
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(ours(tiny_checkpoint).state_dict())
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_frozen_parts_get_no_adapters_and_the_config_says_exactly_which(tiny_checkpoint, tmp_path):
    model = ours(tiny_checkpoint)
    names = inject_lora(model, LoraSettings(r=2, targets=["q_proj", "v_proj"], exclude_parts=("vision",)))
    assert names and all(n.startswith("model.text_model.") for n in names)
    save_adapter(model, tmp_path, LoraSettings(r=2, targets=["q_proj", "v_proj"], exclude_parts=("vision",)))
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == sorted(names)
    with pytest.raises(ValueError, match="no Linear module matches"):
        inject_lora(ours(tiny_checkpoint), LoraSettings(targets=["nothing_here"]))


def test_peft_and_transformers_load_our_adapter_and_give_our_logits(tiny_checkpoint, inputs, tmp_path):
    from peft import PeftModel

    model = ours(tiny_checkpoint)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    inject_lora(model, settings)
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", settings, str(tiny_checkpoint))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(settings.targets)  # PEFT's suffix rule picks the same modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(hf_model(tiny_checkpoint), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), rtol=1e-4, atol=1e-4)


def test_a_peft_adapter_loads_here(tiny_checkpoint, inputs, tmp_path):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(hf_model(tiny_checkpoint), LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "out_proj", "down_proj", "proj"], lora_dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    model = ours(tiny_checkpoint)
    settings = load_adapter(model, tmp_path / "peft")
    assert settings.r == 4 and settings.scaling == 4.0
    assert any(n.endswith("connector.modality_projection.proj") for n in lora_modules(model))
    torch.testing.assert_close(logits(model.eval(), inputs), logits(peft_model, inputs), rtol=1e-4, atol=1e-4)


def test_merge_command_writes_a_checkpoint_transformers_and_we_load(tiny_checkpoint, inputs, tmp_path):
    model = ours(tiny_checkpoint)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets="all-linear")
    inject_lora(model, settings)
    randomise_adapters(model)
    expected = logits(model, inputs)
    save_adapter(model, tmp_path / "adapter", settings)
    from idefics3.finetune.__main__ import main

    assert main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # processor files travel along
    torch.testing.assert_close(logits(ours(tmp_path / "merged"), inputs), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(hf_model(tmp_path / "merged"), inputs), expected, rtol=1e-4, atol=1e-4)


def test_tied_output_head_refuses_lora(tiny_checkpoint):
    model = ours(tiny_checkpoint)
    model.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        inject_lora(model, LoraSettings(targets=["lm_head"]))
