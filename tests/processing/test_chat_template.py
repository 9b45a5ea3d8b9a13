"""Chat templates: byte-identical strings to transformers' apply_chat_template, from every template source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from idefics3 import Idefics3Processor
from processing.processing_data import IDEFICS3_TEMPLATE, document, photo

IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


CONVERSATIONS = {
    "single": [{"role": "user", "content": [IMAGE, text("What is in this image?")]}],
    "multi-turn-multi-image": [
        {"role": "user", "content": [text("What do these images show?"), IMAGE, IMAGE]},
        {"role": "assistant", "content": [text("The first image shows the statue of Liberty. The second a dog.")]},
        {"role": "user", "content": [text("And who is that?")]},
    ],
    "system-and-interleaved": [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [text("Compare"), IMAGE, text("with"), IMAGE, text("please.")]},
    ],
    "assistant-last": [
        {"role": "user", "content": [IMAGE, text("Describe.")]},
        {"role": "assistant", "content": [text("A red circle and")]},
    ],
    "string-content": [{"role": "user", "content": "plain string content"}],
    "openai-image-url": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text("What is this?")]}],
    "none-fields": [{"role": "user", "content": [text("hi")], "name": None}],
}


@pytest.mark.parametrize("folder_name", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("mode", ["plain", "generation-prompt", "continue"])
def test_strings_match_transformers(folders, reference, ours, folder_name, name, mode):
    options = {"plain": {}, "generation-prompt": {"add_generation_prompt": True},
               "continue": {"continue_final_message": True}}[mode]
    conversation = CONVERSATIONS[name]
    if mode == "continue" and name == "string-content":
        pytest.skip("the Idefics3 template drops string content, so there is nothing to continue")
    folder = folders[folder_name]
    expected = reference(folder).apply_chat_template(conversation, **options)
    assert ours(folder).apply_chat_template(conversation, **options) == expected


def test_batch_of_conversations(folders, reference, ours):
    batch = [CONVERSATIONS["single"], CONVERSATIONS["multi-turn-multi-image"]]
    for folder in folders.values():
        expected = reference(folder).apply_chat_template(batch, add_generation_prompt=True)
        assert ours(folder).apply_chat_template(batch, add_generation_prompt=True) == expected


def test_expected_idefics3_rendering(folders, ours):
    """The rendering quoted in the transformers tests (spec section 4)."""
    rendered = ours(folders["idefics3"]).apply_chat_template(CONVERSATIONS["multi-turn-multi-image"],
                                                             add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|>User: What do these images show?<image><image><end_of_utterance>\n"
                        "Assistant: The first image shows the statue of Liberty. The second a dog.<end_of_utterance>\n"
                        "User: And who is that?<end_of_utterance>\nAssistant:")


@pytest.mark.parametrize("folder_name", ["idefics3", "smolvlm"])
def test_tokenize_true_matches_transformers(folders, reference, ours, folder_name):
    """tokenize=True feeds the images named in the messages and does not add a second BOS."""
    conversation = [{"role": "user", "content": [{"type": "image", "image": photo(90, 60)}, text("What is it?"),
                                                 {"type": "image", "image": document(60, 90)}]}]
    folder = folders[folder_name]
    expected = reference(folder).apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")
    out = ours(folder).apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert set(out) == set(expected)
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    ids = ours(folder).apply_chat_template(CONVERSATIONS["multi-turn-multi-image"][1:], tokenize=True)
    assert ids == reference(folder).apply_chat_template(CONVERSATIONS["multi-turn-multi-image"][1:], tokenize=True)
    if folder_name == "idefics3":
        bos = ours(folder).tokenizer.bos_token_id
        assert out["input_ids"][0, 0] == bos and out["input_ids"][0, 1] != bos


def _copy_tokenizer(source, target):
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        shutil.copy(source / name, target / name)


@pytest.mark.parametrize("source", ["chat_template.jinja", "tokenizer_config.json", "processor_config.json"])
def test_template_sources(tmp_path, llama3_folder, reference, source):
    """The same template found in each place a checkpoint may keep it renders the same string."""
    _copy_tokenizer(llama3_folder, tmp_path)
    if source == "chat_template.jinja":
        (tmp_path / "chat_template.jinja").write_text(IDEFICS3_TEMPLATE)
    else:
        config = json.loads((tmp_path / source).read_text())
        (tmp_path / source).write_text(json.dumps({**config, "chat_template": IDEFICS3_TEMPLATE}))
    processor = Idefics3Processor.from_pretrained(tmp_path)
    conversation = CONVERSATIONS["multi-turn-multi-image"]
    expected = reference(llama3_folder).apply_chat_template(conversation, add_generation_prompt=True)
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == expected


def test_named_templates(tmp_path, llama3_folder):
    _copy_tokenizer(llama3_folder, tmp_path)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "shout.jinja").write_text(
        "{% for m in messages %}{{ m['role'] | upper }}{% endfor %}")
    with pytest.raises(ValueError, match="none is named 'default'.*shout"):
        Idefics3Processor.from_pretrained(tmp_path).apply_chat_template(CONVERSATIONS["single"])
    (tmp_path / "chat_template.jinja").write_text(IDEFICS3_TEMPLATE)
    processor = Idefics3Processor.from_pretrained(tmp_path)
    assert processor.apply_chat_template(CONVERSATIONS["single"], chat_template="shout") == "USER"
    assert processor.apply_chat_template(CONVERSATIONS["single"]).startswith("<|begin_of_text|>User:")


JINJA_FEATURES = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 5 %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ m['content'] | tojson }}\n{% generation %}<{{ m['role'] }}>{% endgeneration %}"
    "{% endfor %}{{ dict(a=1) | tojson }}{{ ns.n }}{{ bos_token }}{{ custom_var }}"
    "{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}"
)


def test_jinja_environment_matches_transformers(folders, reference, ours):
    """trim/lstrip blocks, loop controls, namespace, dict, tojson without HTML escaping, generation tag,
    special tokens and extra variables."""
    conversation = [{"role": "user", "content": [text("<b>& 'quotes' é</b>")]}, {"role": "assistant", "content": "ok"}]
    for folder in folders.values():
        kwargs = {"chat_template": JINJA_FEATURES, "custom_var": "X"}
        assert ours(folder).apply_chat_template(conversation, **kwargs) == \
            reference(folder).apply_chat_template(conversation, **kwargs)
    with pytest.raises(ValueError, match="too long"):
        ours(folders["smolvlm"]).apply_chat_template(conversation * 5, chat_template=JINJA_FEATURES)


def test_template_errors(folders, ours):
    processor = ours(folders["idefics3"])
    with pytest.raises(ValueError, match="unsupported content type 'imag'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "imag"}]}])
    with pytest.raises(ValueError, match="unsupported content type 'video'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "path": "a.mp4"}]}])
    with pytest.raises(ValueError, match="'text' block without a 'text' string"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "value": "x"}]}])
    with pytest.raises(ValueError, match="not compatible"):
        processor.apply_chat_template(CONVERSATIONS["single"], add_generation_prompt=True,
                                      continue_final_message=True)
    with pytest.raises(TypeError, match="message 0 must be a dict"):
        processor.apply_chat_template(["hello"])
    with pytest.raises(ValueError, match="non-empty list"):
        processor.apply_chat_template([])
    with pytest.raises(ValueError, match="not valid jinja"):
        processor.apply_chat_template(CONVERSATIONS["single"], chat_template="{% for %}")
