"""GenerationConfig: reading generation_config.json, the <end_of_utterance> safety net, length precedence."""

from __future__ import annotations

import json

import pytest

from idefics3 import GenerationConfig
from idefics3.generation.config import end_of_utterance_id


def test_from_pretrained_reads_json_and_adds_end_of_utterance(tiny_checkpoint, tmp_path):
    config = GenerationConfig.from_pretrained(tiny_checkpoint)
    assert config.eos_token_id == [49279] and config.pad_token_id == 2 and config.bos_token_id == 1
    folder = tmp_path / "ft"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "max_new_tokens": 64, "do_sample": True, "temperature": 0.6, "top_p": None,
         "transformers_version": "4.46.0"}))
    config = GenerationConfig.from_pretrained(folder)
    assert config.eos_token_id == [2, 49279]
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_p) == (64, True, 0.6, 1.0)
    assert config.extra == {"transformers_version": "4.46.0"}


def test_end_of_utterance_id_from_either_tokenizer_file(tiny_checkpoint, tmp_path):
    assert end_of_utterance_id(tiny_checkpoint) == 49279
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"128258": {"content": "<end_of_utterance>", "special": True}}}))
    assert end_of_utterance_id(tmp_path) == 128258
    assert end_of_utterance_id(tmp_path / "missing") is None


def test_missing_json_gives_defaults(tmp_path):
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.eos_token_id == [] and not config.do_sample and config.top_k == 50


def test_length_precedence():
    assert GenerationConfig().max_new_tokens_for(100) == 20
    assert GenerationConfig().max_new_tokens_for(100, max_positions=110) == 10
    assert GenerationConfig(max_length=130).max_new_tokens_for(100) == 30
    assert GenerationConfig(max_length=130, max_new_tokens=5).max_new_tokens_for(100) == 5


def test_update_and_validation():
    config = GenerationConfig(eos_token_id=7)
    assert config.eos_token_id == [7]
    assert config.update(top_p=0.5, temperature=None).top_p == 0.5
    assert config.update(top_p=0.5).temperature == 1.0
    with pytest.raises(TypeError, match="nope"):
        config.update(nope=1)
    for bad in (dict(top_p=2.0), dict(do_sample=True, temperature=0.0), dict(max_new_tokens=-1),
                dict(repetition_penalty=0.0), dict(min_p=1.5)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)
    assert GenerationConfig(pad_token_id=None, eos_token_id=[5, 6]).resolved_pad_token_id == 5
