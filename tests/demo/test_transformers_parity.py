"""transformers' Idefics3ForConditionalGeneration loads the built-in model folder and gives the same answers."""

from __future__ import annotations

import os
import random

import pytest
import torch

import idefics3
from idefics3.demo.evaluate import answer
from idefics3.demo.questions import KINDS, make_example

MODEL = os.environ.get("IDEFICS3_DEMO_PARITY_MODEL") or str(idefics3.DEMO_MODEL)


@pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL, "config.json")), reason="no built-in model")
def test_transformers_gives_the_same_answers():
    transformers = pytest.importorskip("transformers")
    hf_processor = transformers.Idefics3Processor.from_pretrained(MODEL)
    hf_model = transformers.Idefics3ForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    processor = idefics3.Idefics3Processor.from_pretrained(MODEL)
    model = idefics3.Idefics3ForConditionalGeneration.from_pretrained(MODEL).eval()
    rng = random.Random(4242)
    for kind in KINDS * 2:
        ex = make_example(rng, kind)
        ours = answer(model, processor, ex.images, ex.question)
        content = [{"type": "image"} for _ in ex.images] + [{"type": "text", "text": ex.question}]
        prompt = hf_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = hf_processor(text=prompt, images=ex.images, return_tensors="pt")
        with torch.inference_mode():
            out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
        theirs = hf_processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert ours == theirs, (kind, ex.question, ours, theirs)
