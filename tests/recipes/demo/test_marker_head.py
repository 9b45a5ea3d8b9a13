"""The demo recipe's structured initial head (on unless `--no-marker-head`): at init, every image token attends to
its own cell marker and carries that marker's row and column out of layer 0; a plain random init does neither."""

from __future__ import annotations

import random

import pytest
import torch
from recipes.demo.conversations import conversation
from recipes.demo.dataset import write_dataset
from recipes.demo.marker_head import check, reserved_dims
from recipes.demo.recipe import init_checkpoint, tokenizer_corpus

from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return tokenizer_corpus(write_dataset(tmp_path_factory.mktemp("marker-data"), 0, 40, name="train.jsonl", turns=4))


@pytest.fixture(scope="module")
def inits(tmp_path_factory, texts):
    work = tmp_path_factory.mktemp("marker-head")
    return {flag: init_checkpoint(work / f"init-{flag}", texts, marker_head=flag) for flag in (True, False)}


def chats(processor, n=6):
    rng = random.Random(4)
    for _ in range(n):  # one- and two-image chats of four turns: prompts up to ~300 tokens
        ex = conversation(rng, {"position": 1.0, "two": 1.0}, turns=4)
        text = processor.apply_chat_template(ex.messages())
        yield dict(processor(text=text, images=ex.images, return_tensors="pt"))


def test_image_tokens_attend_to_their_marker_and_carry_its_cell(inits):
    model = Idefics3ForConditionalGeneration.from_pretrained(inits[True]).eval()
    processor = Idefics3Processor.from_pretrained(inits[True])
    dims = reserved_dims(model.config.text_config.hidden_size)
    out, cells = {}, 0
    model.model.text_model.layers[0].register_forward_hook(lambda mod, args, o: out.__setitem__("h", o))
    for batch in chats(processor):
        assert check(model, batch) > 0.99
        with torch.inference_mode():
            model(**batch)
        ids = batch["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero().flatten()
        tokens = processor.tokenizer.convert_ids_to_tokens(ids[image - 1].tolist())
        h = out["h"][0, image]  # [N, H] after layer 0
        for tok, row, col in zip(tokens, h[:, dims["row"]].argmax(-1), h[:, dims["col"]].argmax(-1)):
            if tok.startswith("<row_"):  # <row_r_col_c>
                r, c = int(tok.split("_")[1]), int(tok.split("_")[3].rstrip(">"))
                assert (int(row) + 1, int(col) + 1) == (r, c)
                cells += 1
    assert cells >= 6 * 16  # every tile of every image


def test_plain_init_has_no_such_head(inits):
    model = Idefics3ForConditionalGeneration.from_pretrained(inits[False]).eval()
    processor = Idefics3Processor.from_pretrained(inits[False])
    assert max(check(model, batch) for batch in chats(processor, 2)) < 0.5


@pytest.mark.parametrize("heads", [4, 6])
def test_with_a_key_value_head_per_query_head_two_query_heads_still_read_the_markers(tmp_path, texts, heads):
    """With one key/value head per query head (`--heads N --kv-heads N`; the demo model has 6 and 6) key/value
    head 1 repeats head 0, so query heads 0 and 1 read the markers' cells and the others stay free."""
    folder = init_checkpoint(tmp_path / "mha", texts, marker_head=True, heads=heads, kv_heads=heads)
    model = Idefics3ForConditionalGeneration.from_pretrained(folder)
    attn, hd = model.model.text_model.layers[0].self_attn, model.config.text_config.head_dim
    assert model.config.text_config.num_key_value_heads == model.config.text_config.num_attention_heads == heads
    for w in (attn.k_proj.weight, attn.v_proj.weight):
        assert w.shape[0] == heads * hd
        assert torch.equal(w[hd:2 * hd], w[:hd]) and not torch.equal(w[2 * hd:3 * hd], w[:hd])
    processor = Idefics3Processor.from_pretrained(folder)
    assert min(check(model, batch) for batch in chats(processor, 2)) > 0.99
