"""Greedy generate() is token-identical to transformers' generate (fp32) on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

NEW = 12


def both(hf, model, inputs, **kwargs):
    ref = hf.generate(**inputs, do_sample=False, pad_token_id=2, **kwargs)
    ours = model.generate(**inputs, **kwargs)
    return ref, ours


@pytest.fixture(scope="module")
def mixed_batch(processor, images, chat_prompt):
    """Three rows with 2, 0 and 1 images and different lengths, left padded by the processor."""
    prompts = [chat_prompt("Can you describe the two images?", 2),
               chat_prompt("Write a very long and detailed poem about the sea and the sky.", 0),
               chat_prompt("What is this?", 1)]
    return processor(text=prompts, images=[[images[0], images[2]], [], [images[1]]], return_tensors="pt",
                     padding=True)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_single_prompt(tiny_hf_model, model, processor, images, chat_prompt, n_images):
    prompt = chat_prompt("Can you describe this?", n_images)
    inputs = processor(text=prompt, images=images[:n_images] or None, return_tensors="pt")
    ref, ours = both(tiny_hf_model, model, inputs, max_new_tokens=NEW)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_mixed_batch(tiny_hf_model, model, mixed_batch):
    assert mixed_batch["attention_mask"][:, 0].tolist().count(0) >= 1  # really left padded
    ref, ours = both(tiny_hf_model, model, mixed_batch, max_new_tokens=NEW)
    assert torch.equal(ours, ref)


def test_eos_stops_each_row_and_pads(tiny_hf_model, model, mixed_batch):
    """An eos id that row 0 produces mid-way: row 0 stops there and is padded, the others run on."""
    free = model.generate(**mixed_batch, max_new_tokens=NEW)[:, -NEW:]
    eos = int(free[0, 4])
    first = free[0].tolist().index(eos)
    ref, ours = both(tiny_hf_model, model, mixed_batch, max_new_tokens=NEW, eos_token_id=[eos])
    assert torch.equal(ours, ref)
    new = ours[:, -NEW:] if ours.shape[1] == ref.shape[1] else ours
    assert new[0, first] == eos and (new[0, first + 1:] == 2).all()


def test_min_new_tokens(tiny_hf_model, model, mixed_batch):
    free = model.generate(**mixed_batch, max_new_tokens=NEW)[:, -NEW:]
    eos = int(free[0, 2])
    ref, ours = both(tiny_hf_model, model, mixed_batch, max_new_tokens=NEW, eos_token_id=[eos], min_new_tokens=6)
    assert torch.equal(ours, ref)


def test_repetition_penalty_greedy(tiny_hf_model, model, mixed_batch):
    ref, ours = both(tiny_hf_model, model, mixed_batch, max_new_tokens=NEW, repetition_penalty=1.5)
    assert torch.equal(ours, ref)


def test_length_settings(tiny_hf_model, model, processor, chat_prompt):
    inputs = processor(text=chat_prompt("Hello!", 0), return_tensors="pt")
    t = inputs["input_ids"].shape[1]
    ref, ours = both(tiny_hf_model, model, inputs)  # nothing set: transformers' 20 new tokens
    assert ours.shape[1] == t + 20 and torch.equal(ours, ref)
    ref, ours = both(tiny_hf_model, model, inputs, max_length=t + 5)
    assert ours.shape[1] == t + 5 and torch.equal(ours, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=0), inputs["input_ids"])


def test_stop_strings(tiny_hf_model, model, processor, tokenizer, hf_tokenizer, chat_prompt):
    """A stop string taken from the middle of the free-running answer stops where transformers stops."""
    inputs = processor(text=chat_prompt("Tell me a story.", 0), return_tensors="pt")
    t = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=NEW)[0, t:].tolist()
    piece = tokenizer.decode(free[5:7], skip_special_tokens=False)
    stop = piece[1:4] if len(piece) > 4 else piece
    ref = tiny_hf_model.generate(**inputs, do_sample=False, pad_token_id=2, max_new_tokens=NEW, stop_strings=[stop],
                                 tokenizer=hf_tokenizer)
    ours = model.generate(**inputs, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tokenizer)
    assert torch.equal(ours, ref)
    assert ours.shape[1] < t + NEW
    assert stop in tokenizer.decode(ours[0, t:].tolist(), skip_special_tokens=False)


def test_stop_strings_stop_each_row_of_a_batch(tiny_hf_model, model, mixed_batch, tokenizer, hf_tokenizer):
    t = mixed_batch["input_ids"].shape[1]
    free = model.generate(**mixed_batch, max_new_tokens=NEW)[:, t:].tolist()
    stops = [tokenizer.decode(free[0][3:4]), tokenizer.decode(free[2][6:8])]
    ref = tiny_hf_model.generate(**mixed_batch, do_sample=False, pad_token_id=2, max_new_tokens=NEW,
                                 stop_strings=stops, tokenizer=hf_tokenizer)
    ours = model.generate(**mixed_batch, max_new_tokens=NEW, stop_strings=stops, tokenizer=tokenizer)
    assert torch.equal(ours, ref)
    assert (ours[0, t + 4:] == 2).all()  # row 0 stopped after its 4th token


def test_end_of_utterance_stops_even_if_generation_config_forgets_it(tiny_checkpoint, tmp_path, processor,
                                                                     chat_prompt):
    """A fine-tuned checkpoint with eos [2] only: generation still stops at <end_of_utterance> (49279)."""
    import json
    import shutil

    from idefics3 import Idefics3ForConditionalGeneration

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ft")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 2}))
    model = Idefics3ForConditionalGeneration.from_pretrained(folder)
    inputs = processor(text=chat_prompt("Hi", 0), return_tensors="pt")
    t = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=NEW)[0, t:].tolist()
    assert 49279 not in free
    # Make the model say <end_of_utterance> where it said free[3]: swap the two lm_head rows.
    eou, word = 49279, free[3]
    first = free.index(word)
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eou, word]] = w[[word, eou]]
    out = model.generate(**inputs, max_new_tokens=NEW)[0, t:].tolist()
    assert out == free[:first] + [eou]
    assert 49279 in model.generation_config.eos_token_id and 2 in model.generation_config.eos_token_id


def test_seeded_sampling_is_reproducible_and_batch_independent(model, processor, images, chat_prompt):
    """The same seed gives the same tokens twice, and each row of a batch what it gives alone."""
    settings = dict(max_new_tokens=NEW, do_sample=True, temperature=1.3, top_k=0, top_p=0.95, seed=1234)
    texts = [chat_prompt("Tell me anything.", 0), chat_prompt("What is this?", 1)]
    imgs = [[], [images[0]]]
    batch = processor(text=texts, images=imgs, return_tensors="pt", padding=True)
    out = model.generate(**batch, **settings)
    assert torch.equal(out, model.generate(**batch, **settings))
    t = batch["input_ids"].shape[1]
    for i in range(2):
        single = processor(text=texts[i], images=imgs[i] or None, return_tensors="pt")
        alone = model.generate(**single, **settings)[0, single["input_ids"].shape[1]:].tolist()
        row = out[i, t:].tolist()
        assert row[:len(alone)] == alone
    other = model.generate(**batch, **{**settings, "seed": 99})
    assert not torch.equal(out, other)


def test_sampling_with_global_rng_and_generators(model, processor, chat_prompt):
    inputs = processor(text=chat_prompt("Hi", 0), return_tensors="pt")
    settings = dict(max_new_tokens=NEW, do_sample=True, temperature=2.0)
    torch.manual_seed(0)
    a = model.generate(**inputs, **settings)
    torch.manual_seed(0)
    assert torch.equal(a, model.generate(**inputs, **settings))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(model.generate(**inputs, generator=g1, **settings),
                       model.generate(**inputs, generator=g2, **settings))


def test_unsupported_arguments_are_rejected(model, processor, chat_prompt):
    inputs = processor(text=chat_prompt("Hi", 0), return_tensors="pt")
    model.generate(**inputs, max_new_tokens=1, use_cache=True, num_beams=1)  # neutral values are fine
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(**inputs, max_new_tokens=1, num_beams=4)
    with pytest.raises(TypeError, match="typo_setting"):
        model.generate(**inputs, max_new_tokens=1, typo_setting=3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(**inputs, max_new_tokens=1, do_sample=True, temperature=0.0)
