"""Fixtures for the processing tests: checkpoint folders built at test time, and reference processors
(transformers' Idefics3Processor with the PIL image processor) built from the same folders."""

from __future__ import annotations

import warnings

import pytest

from processing.processing_data import SMOLVLM_FOLDER, make_llama3_folder, make_v5_layout


@pytest.fixture(scope="session")
def llama3_folder(tmp_path_factory):
    """Idefics3-8B-like: Llama-3-style tokenizer, 364-pixel tiles, longest edge 1456, 169 tokens per tile."""
    return make_llama3_folder(tmp_path_factory.mktemp("idefics3-8b-like"))


@pytest.fixture(scope="session")
def smolvlm_folder():
    """SmolVLM-256M-like: the real 49k SmolVLM tokenizer, 512-pixel tiles, longest edge 2048, 64 tokens."""
    return SMOLVLM_FOLDER


@pytest.fixture(scope="session")
def folders(llama3_folder, smolvlm_folder):
    return {"idefics3": llama3_folder, "smolvlm": smolvlm_folder}


@pytest.fixture(scope="session")
def v5_folder(tmp_path_factory, smolvlm_folder):
    return make_v5_layout(smolvlm_folder, tmp_path_factory.mktemp("smolvlm-5x"))


@pytest.fixture(scope="session")
def reference():
    """reference(folder, **overrides) -> transformers.Idefics3Processor with Idefics3ImageProcessorPil (cached)."""
    from transformers import Idefics3Processor
    from transformers.utils import logging

    logging.set_verbosity_error()
    cache = {}

    def build(folder, **overrides):
        key = (str(folder), repr(sorted(overrides.items())))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = Idefics3Processor.from_pretrained(str(folder), backend="pil", **overrides)
            assert type(cache[key].image_processor).__name__ == "Idefics3ImageProcessorPil"
        return cache[key]

    return build


@pytest.fixture(scope="session")
def ours():
    """ours(folder, **overrides) -> idefics3.Idefics3Processor (cached)."""
    from idefics3 import Idefics3Processor

    cache = {}

    def build(folder, **overrides):
        key = (str(folder), repr(sorted(overrides.items())))
        if key not in cache:
            cache[key] = Idefics3Processor.from_pretrained(folder, **overrides)
        return cache[key]

    return build
