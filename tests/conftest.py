"""Shared fixtures: seeded tiny checkpoints built by transformers (see tests/checkpoints.py)."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_hf_model, save_checkpoint, tiny_config

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """The kernels' timing verdicts (kernels/calibrate.py) go to a folder of the test run, not the user's cache,
    and are not measured at all (IDEFICS3_CALIBRATE=0: our kernels wherever they run). A verdict timed on a busy
    machine can flip between processes, and with it a bf16 path, so a CLI subprocess and the test that checks its
    answer in-process could take different paths. The calibration tests turn it back on for themselves."""
    import os

    saved = {name: os.environ.get(name) for name in ("IDEFICS3_CACHE_DIR", "IDEFICS3_CALIBRATE")}
    folder = tmp_path_factory.mktemp("calibration")
    os.environ["IDEFICS3_CACHE_DIR"] = str(folder)
    os.environ["IDEFICS3_CALIBRATE"] = "0"
    yield folder
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_hf_model():
    """The default tiny transformers model (fp32, eager), shared read-only across tests."""
    return build_hf_model(tiny_config())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_hf_model):
    """A 5.x-layout checkpoint folder of `tiny_hf_model`, with processor files (real SmolVLM tokenizer)."""
    return save_checkpoint(tiny_hf_model, tmp_path_factory.mktemp("tiny5"), layout="5.x")


@pytest.fixture(scope="session")
def tiny_checkpoint_4x(tmp_path_factory, tiny_hf_model):
    """The same model in the 4.x Hub layout, with sharded safetensors and an index."""
    return save_checkpoint(tiny_hf_model, tmp_path_factory.mktemp("tiny4"), layout="4.x")
