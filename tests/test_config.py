"""config.json in the 4.x and 5.x layouts, and clear errors for configs that cannot be an Idefics3 model."""

from __future__ import annotations

import json

import pytest

from checkpoints import tiny_config, to_4x_config
from idefics3 import ConfigError, Idefics3Config
from idefics3.presets import preset


def write(tmp_path, raw: dict):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def hf_dict(cfg: dict) -> dict:
    from transformers import Idefics3Config as HF

    return json.loads(HF(**cfg).to_json_string(use_diff=False))


def test_5x_and_4x_layouts_read_the_same(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = tiny_config(text={"rope_parameters": rope, "max_position_embeddings": 512})
    raw5 = hf_dict(cfg)
    raw5["dtype"] = "bfloat16"
    five = Idefics3Config.from_dict(raw5)
    write(tmp_path, raw5)
    to_4x_config(tmp_path / "config.json")
    raw4 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in raw4["text_config"] and raw4["text_config"]["rope_theta"] == 500000.0
    four = Idefics3Config.from_pretrained(tmp_path)
    assert four.text_config == five.text_config and four.vision_config.hidden_size == 32
    assert five.text_config.rope_scaling["rope_type"] == "llama3"
    assert five.text_config.rope_theta == 500000.0
    assert five.pad_token_id == 128002  # written as "_pad_token_id" by 5.x
    assert five.torch_dtype == "bfloat16" and four.torch_dtype == "bfloat16"  # dtype vs torch_dtype


def test_4x_rope_scaling_with_legacy_type_key_and_siglip_vision_type():
    raw = preset("Idefics3-8B-Llama3")
    raw["text_config"]["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    raw["vision_config"]["model_type"] = "siglip_vision_model"
    cfg = Idefics3Config.from_dict(raw)
    assert cfg.text_config.rope_scaling["rope_type"] == "llama3"
    assert cfg.text_config.head_dim == 128 and cfg.text_config.num_key_value_heads == 8


def test_unknown_keys_are_ignored_and_smolvlm_model_type_loads():
    raw = preset("SmolVLM-256M-Instruct")
    raw.update(model_type="smolvlm", perceiver_config={"x": 1}, use_resampler=False, qk_layer_norms=False)
    raw["text_config"]["some_future_key"] = 3
    cfg = Idefics3Config.from_dict(raw)
    assert cfg.model_type == "smolvlm" and cfg.image_seq_len == 64
    assert cfg.to_dict()["perceiver_config"] == {"x": 1}  # kept for save_pretrained


def test_derived_head_dim_and_kv_heads():
    raw = preset("SmolVLM-Instruct")
    del raw["text_config"]["num_key_value_heads"]
    cfg = Idefics3Config.from_dict(raw).text_config
    assert cfg.head_dim == 2048 // 32 and cfg.num_key_value_heads == 32


def test_round_trip_through_transformers(tmp_path):
    from transformers import Idefics3Config as HF

    ours = Idefics3Config.from_dict(preset("Idefics3-8B-Llama3"))
    ours.save_pretrained(tmp_path)
    theirs = HF.from_pretrained(tmp_path)
    assert theirs.text_config.rope_parameters["rope_type"] == "llama3"
    assert theirs.text_config.num_key_value_heads == 8 and theirs.image_token_id == 128257
    again = Idefics3Config.from_pretrained(tmp_path)
    assert again.text_config == ours.text_config and again.vision_config == ours.vision_config


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("model_type"), "has no 'model_type'"),
    (lambda r: r.update(model_type="llava"), "model_type 'llava' is not an Idefics3 model"),
    (lambda r: r.pop("text_config"), "missing required key 'text_config'"),
    (lambda r: r["text_config"].pop("hidden_size"), "text_config is missing required key.*hidden_size"),
    (lambda r: r["vision_config"].pop("patch_size"), "vision_config is missing required key.*patch_size"),
    (lambda r: r["vision_config"].update(model_type="clip_vision_model"), "'clip_vision_model' is not a SigLIP"),
    (lambda r: r["text_config"].update(num_key_value_heads=5), "not a multiple of num_key_value_heads"),
    (lambda r: r["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
    (lambda r: r.update(scale_factor=5), "scale_factor 5 does not divide"),
    (lambda r: r["text_config"].update(hidden_size="big"), "text_config.hidden_size must be a number"),
])
def test_bad_configs_name_the_problem(tmp_path, mutate, message):
    raw = preset("SmolVLM-256M-Instruct")
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        Idefics3Config.from_pretrained(write(tmp_path, raw))


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Idefics3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Idefics3Config.from_pretrained(tmp_path)
