"""Tokenizer parity with the transformers tokenizer loaded from the same folder: ids, BOS rules, padding,
truncation, decoding."""

from __future__ import annotations

import json
import shutil

import pytest

from idefics3.processing.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "In this image, we see<image><image> the Statue of Liberty.\n\nNext line\r\n",
    "<fake_token_around_image><row_1_col_1><image><image>\n<global-img><end_of_utterance>",
    "unicode: café, naïve, 日本語, emoji 🙂, tabs\tand\u00a0nbsp",
    "<|begin_of_text|>User: hi<end_of_utterance>\nAssistant:",
    "",
]


@pytest.fixture(params=["idefics3", "smolvlm"])
def pair(request, folders, reference, ours):
    """(our processor's tokenizer, transformers' processor tokenizer) for each test folder."""
    folder = folders[request.param]
    return ours(folder).tokenizer, reference(folder).tokenizer


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers(pair, add_special_tokens):
    mine, theirs = pair
    for text in TEXTS:
        assert mine(text, add_special_tokens=add_special_tokens) == dict(
            theirs(text, add_special_tokens=add_special_tokens)), text
    batch = mine(TEXTS, add_special_tokens=add_special_tokens)
    assert batch == dict(theirs(TEXTS, add_special_tokens=add_special_tokens))


def test_bos_rules(folders, ours):
    llama = ours(folders["idefics3"]).tokenizer
    bos = llama.bos_token_id
    assert llama("hi")["input_ids"][0] == bos and llama("hi", add_special_tokens=False)["input_ids"][0] != bos
    # A rendered template already starts with the BOS string; add_special_tokens=True adds a second one.
    assert llama("<|begin_of_text|>User: hi")["input_ids"][:2] == [bos, bos]
    smol = ours(folders["smolvlm"]).tokenizer
    assert smol("hi")["input_ids"] == smol("hi", add_special_tokens=False)["input_ids"]  # no BOS post-processor


@pytest.mark.parametrize("options", [
    {"padding": True}, {"padding": "longest", "padding_side": "right"}, {"padding": "max_length", "max_length": 40},
    {"padding": True, "pad_to_multiple_of": 8}, {"truncation": True, "max_length": 5},
    {"padding": True, "truncation": True, "max_length": 6}, {"max_length": 4},
    {"padding": True, "return_attention_mask": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_padding_and_truncation_match_transformers(pair, options):
    mine, theirs = pair
    texts = TEXTS[:5]
    assert mine(texts, **options) == dict(theirs(texts, **options))
    assert mine.padding_side == theirs.padding_side == "left"


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, skip):
    mine, theirs = pair
    batch = mine(TEXTS, padding=True)["input_ids"]
    assert mine.batch_decode(batch, skip_special_tokens=skip) == theirs.batch_decode(batch, skip_special_tokens=skip)
    assert mine.decode(batch[2], skip_special_tokens=skip) == theirs.decode(batch[2], skip_special_tokens=skip)


def test_special_token_attributes(pair):
    mine, theirs = pair
    assert mine.special_tokens_map == theirs.special_tokens_map
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert len(mine) == len(theirs)
    assert mine.convert_tokens_to_ids(["<image>", "<row_1_col_1>", "never-a-token"]) == theirs.convert_tokens_to_ids(
        ["<image>", "<row_1_col_1>", "never-a-token"])


def test_image_tokens_missing_from_tokenizer_json_are_added(tmp_path, llama3_folder, reference, ours):
    """A tokenizer.json without the image tokens: the processor adds them as special tokens after the vocab."""
    from tokenizers import Tokenizer as Backend

    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        shutil.copy(llama3_folder / name, tmp_path / name)
    data = json.loads((llama3_folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in
                            ("<fake_token_around_image>", "<image>", "<end_of_utterance>")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert Backend.from_file(str(tmp_path / "tokenizer.json")).token_to_id("<image>") is None
    config = json.loads((llama3_folder / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    config.pop("additional_special_tokens")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    mine, theirs = ours(tmp_path), reference(tmp_path)
    assert mine.image_token_id == theirs.image_token_id
    assert mine.end_of_utterance_token_id == theirs.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    for text in TEXTS:
        assert mine.tokenizer(text) == dict(theirs.tokenizer(text))


def test_folder_without_post_processor_adds_no_bos(tmp_path, llama3_folder):
    from transformers import AutoTokenizer

    data = json.loads((llama3_folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(llama3_folder / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    mine, theirs = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert mine(text) == dict(theirs(text))
    assert mine("hi")["input_ids"][0] != mine.bos_token_id


def test_add_bos_token_override(llama3_folder):
    forced = Tokenizer.from_folder(llama3_folder, add_bos_token=True, add_eos_token=True)
    ids = forced("hi")["input_ids"]
    assert ids[0] == forced.bos_token_id and ids[-1] == forced.eos_token_id


def test_errors(tmp_path, llama3_folder):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    tokenizer = Tokenizer.from_folder(llama3_folder)
    with pytest.raises(TypeError, match="string or a list of strings"):
        tokenizer([1, 2, 3])
    with pytest.raises(ValueError, match="padding must be"):
        tokenizer("x", padding="sideways")
    with pytest.raises(TypeError, match="unknown tokenizer option"):
        Tokenizer.from_folder(llama3_folder, padding_sid="left")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.from_folder(tmp_path)
