"""EngineBackend (eval/runner.py): on a CPU its worker thread encodes each new image ahead, into the engine's
encoder cache, which the engine then only hits; the answers are those of encoding inside the engine, and a
failure while encoding ahead is left to the engine."""

from __future__ import annotations

import pytest

import idefics3
from idefics3.demo.evaluate import ShapesTask
from idefics3.eval import runner
from idefics3.eval.harness import Settings, evaluate
from idefics3.eval.runner import EngineBackend

pytestmark = pytest.mark.skipif(not (idefics3.DEMO_MODEL / "config.json").is_file(), reason="no built-in model")
COUNT = 12


@pytest.fixture(scope="module")
def demo():
    return idefics3.load_model(idefics3.DEMO_MODEL, dtype="fp32"), idefics3.load_processor(idefics3.DEMO_MODEL)


def answer(demo, tmp_path, **options) -> tuple[list[str], EngineBackend]:
    model, processor = demo
    if getattr(model, "encoder_cache", None) is not None:
        model.encoder_cache.clear()
    backend = EngineBackend(model, processor, batch=4, **options)
    hits, misses = backend.encoder_cache.hits, backend.encoder_cache.misses
    settings = Settings(output=tmp_path, overwrite=True, progress=False)
    (result,) = evaluate([ShapesTask(seed=1000, count=COUNT)], settings, lambda: backend, {})
    backend.lookups = (backend.encoder_cache.hits - hits, backend.encoder_cache.misses - misses)
    return [r["answer"] for r in result.records], backend


def test_images_encoded_ahead_are_only_hit(demo, tmp_path):
    ahead, backend = answer(demo, tmp_path / "ahead", encode_ahead=True)
    assert backend.lookups[0] >= COUNT and backend.lookups[1] == 0  # every frame found, none encoded in a step
    inline, backend = answer(demo, tmp_path / "inline", encode_ahead=False)
    assert backend.lookups[1] >= COUNT
    assert ahead == inline


def test_images_are_encoded_ahead_by_default_only_where_cores_are_idle(demo, monkeypatch):
    """Measured (bench/eval.py): +21-23% samples/s with one torch thread of two cores, -5% with both busy."""
    monkeypatch.setattr(runner, "usable_cores", lambda: 4)
    monkeypatch.setattr(runner.torch, "get_num_threads", lambda: 2)
    assert EngineBackend(*demo).encode_ahead
    monkeypatch.setattr(runner.torch, "get_num_threads", lambda: 4)
    assert not EngineBackend(*demo).encode_ahead
    assert EngineBackend(*demo, encode_ahead=True).encode_ahead


def test_a_failure_while_encoding_ahead_is_left_to_the_engine(demo, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    reference, _ = answer(demo, tmp_path / "reference", encode_ahead=False)
    monkeypatch.setattr(runner, "encode_frames", broken)
    got, backend = answer(demo, tmp_path / "broken", encode_ahead=True)
    assert got == reference and backend.lookups[1] >= COUNT
