"""The model card's snippet runs with only its import line changed (the checkpoint is a local folder)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# SmolVLM's model card, verbatim except: the import line, the checkpoint name (a folder), local image files
# instead of URLs (tests never touch the network), and a print replaced by keeping the result.
SNIPPET = '''
import torch
from idefics3 import AutoProcessor, AutoModelForVision2Seq, load_image

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

image1 = load_image(IMAGE1)
image2 = load_image(IMAGE2)

processor = AutoProcessor.from_pretrained(CHECKPOINT)
model = AutoModelForVision2Seq.from_pretrained(CHECKPOINT, torch_dtype=torch.bfloat16).to(DEVICE)

messages = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "Can you describe the two images?"}
        ]
    },
]

prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[image1, image2], return_tensors="pt")
inputs = {k: v.to(DEVICE) for k, v in inputs.items()}

generated_ids = model.generate(**inputs, max_new_tokens=500)
generated_texts = processor.batch_decode(
    generated_ids,
    skip_special_tokens=True,
)
'''


def test_model_card_snippet(tiny_checkpoint, tmp_path):
    paths = []
    for i, size in enumerate([(60, 40), (30, 64)]):
        path = tmp_path / f"image{i + 1}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    scope = {"CHECKPOINT": str(tiny_checkpoint), "IMAGE1": paths[0], "IMAGE2": paths[1]}
    exec(compile(SNIPPET, "model_card_snippet", "exec"), scope)
    ids, texts, inputs = scope["generated_ids"], scope["generated_texts"], scope["inputs"]
    prompt_len = inputs["input_ids"].shape[1]
    assert ids.shape[0] == 1 and prompt_len < ids.shape[1] <= prompt_len + 500
    assert torch_equal(ids[0, :prompt_len], inputs["input_ids"][0])
    assert isinstance(texts, list) and len(texts) == 1 and texts[0].startswith("User:")
    assert scope["model"].dtype.is_floating_point and str(scope["model"].dtype) == "torch.bfloat16"


def torch_equal(a, b) -> bool:
    return bool((a.cpu() == b.cpu()).all())
