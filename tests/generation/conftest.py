"""Fixtures for the generation tests: our model on the shared tiny checkpoint, a processor, test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
    """Our fp32 model loaded from the tiny checkpoint (shared read-only)."""
    from idefics3 import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    """The processor of the tiny checkpoint: ours once it exists, else transformers' (tests only)."""
    try:
        from idefics3.processing.processor import Idefics3Processor
    except ImportError:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(tiny_checkpoint)
    return Idefics3Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def tokenizer(processor):
    return processor.tokenizer


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_checkpoint):
    """transformers' tokenizer, for the transformers side of comparisons (its stop strings need its vocab API)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def make_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def images():
    """Three small random images of different shapes (1, 2x2+1 and 1x2+1 tiles at the tiny resolution)."""
    return [make_image(0, 30, 28), make_image(1, 64, 60), make_image(2, 30, 64)]


@pytest.fixture(scope="session")
def chat_prompt(processor):
    """chat_prompt(text, n_images) -> the rendered one-turn chat prompt with n image parts before the text."""

    def render(text: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    return render
