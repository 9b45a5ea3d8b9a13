"""Loading and saving: both layouts, sharded files, round trips with transformers, and every error message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_hf_model, save_checkpoint, tiny_config
from idefics3 import Idefics3ForConditionalGeneration, ModelNotFoundError, WeightsError
from inputs import pixels, prompt


def logits(model, ids, pv):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pv).logits


def test_4x_layout_with_shards(tiny_checkpoint_4x, tiny_hf_model):
    assert (tiny_checkpoint_4x / "model.safetensors.index.json").is_file()
    assert len(list(tiny_checkpoint_4x.glob("model-*.safetensors"))) > 1
    ours = Idefics3ForConditionalGeneration.from_pretrained(str(tiny_checkpoint_4x))
    ids, pv = prompt([1], 4), pixels(1, [1], 32)
    assert torch.allclose(logits(ours, ids, pv), logits(tiny_hf_model, ids, pv), atol=1e-5)


def test_dtype_and_device_at_load(tiny_checkpoint):
    for kw, dtype in [({"torch_dtype": torch.bfloat16}, torch.bfloat16), ({"dtype": "fp16"}, torch.float16),
                      ({"dtype": "auto"}, torch.float32), ({}, torch.float32)]:
        model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cpu", **kw)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert model.device.type == "cpu" and not any(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="int3")


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_our_save_loads_in_transformers_and_back(tmp_path, tiny_checkpoint, shard):
    from transformers import Idefics3ForConditionalGeneration as HF

    ours = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ours.save_pretrained(tmp_path / "saved", max_shard_size=shard)
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file() == (shard is not None)
    assert (tmp_path / "saved" / "tokenizer.json").is_file()  # processor files travel along
    theirs = HF.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    again = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    ids, pv = prompt([2], 4), pixels(1, [2], 32)
    ref = logits(ours, ids, pv)
    assert torch.allclose(logits(theirs.eval(), ids, pv), ref, atol=1e-5)
    assert torch.equal(logits(again, ids, pv), ref)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_tied_checkpoint_saves_without_lm_head(tmp_path):
    from transformers import Idefics3ForConditionalGeneration as HF

    folder = save_checkpoint(build_hf_model(tiny_config(tie_word_embeddings=True)), tmp_path / "t", processor=False)
    ours = Idefics3ForConditionalGeneration.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "out")
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    theirs = HF.from_pretrained(tmp_path / "out")
    assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight)


# ---- errors ---------------------------------------------------------------------------------------
@pytest.fixture
def copy_of(tmp_path, tiny_checkpoint):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def rewrite(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_missing_keys_are_listed(copy_of):
    rewrite(copy_of, lambda s: (s.pop("model.text_model.norm.weight"), s.pop("lm_head.weight")))
    with pytest.raises(WeightsError, match=r"missing keys \(2\): lm_head.weight, model.text_model.norm.weight"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)


def test_unexpected_keys_are_listed(copy_of):
    rewrite(copy_of, lambda s: s.update({"model.vision_model.head.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): model.vision_model.head.weight"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)


def test_shape_mismatch_names_tensor_and_shapes(copy_of):
    rewrite(copy_of, lambda s: s.update({"lm_head.weight": torch.zeros(10, 64)}))
    with pytest.raises(WeightsError, match=r"shape mismatch for lm_head.weight: checkpoint has \[10, 64\].*"
                                           r"expects \[49280, 64\]"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)


def test_truncated_file(copy_of):
    path = copy_of / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors: the file is truncated or corrupt"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)


def test_corrupt_header(copy_of):
    path = copy_of / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)


def test_pickled_weights_are_refused(copy_of):
    (copy_of / "model.safetensors").unlink()
    (copy_of / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(WeightsError, match=r"only pickled weights \(pytorch_model.bin\).*never unpickles"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)


def test_no_weights_and_missing_shard(copy_of, tiny_checkpoint_4x, tmp_path):
    (copy_of / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights in"):
        Idefics3ForConditionalGeneration.from_pretrained(copy_of)
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint_4x, sharded)
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(WeightsError, match=f"names shard\\(s\\) that are not in .*: {victim.name}"):
        Idefics3ForConditionalGeneration.from_pretrained(sharded)


def test_missing_folder_says_where_it_looked(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model folder .*nope/deeper.* does not exist"):
        Idefics3ForConditionalGeneration.from_pretrained(str(tmp_path / "nope" / "deeper"))


def _hub_env(tmp_path, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1" if offline else "0")
    return env


def test_hub_id_resolves_from_the_local_cache(tmp_path, tiny_checkpoint):
    """A Hub id is found in huggingface_hub's cache layout under HF_HOME, offline, with nothing fetched."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-idefics3"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_checkpoint, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    code = ("from idefics3 import Idefics3ForConditionalGeneration as M; "
            "m = M.from_pretrained('acme/tiny-idefics3'); print(m.checkpoint_dir, m.num_parameters())")
    out = subprocess.run([sys.executable, "-c", code], env=_hub_env(tmp_path, True), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(snap) in out.stdout


def test_hub_id_not_in_cache_offline_says_where_it_looked(tmp_path):
    code = "from idefics3 import Idefics3ForConditionalGeneration as M; M.from_pretrained('acme/absent')"
    out = subprocess.run([sys.executable, "-c", code], env=_hub_env(tmp_path, True), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "ModelNotFoundError: model 'acme/absent' not found" in last
    assert "HF_HUB_OFFLINE=1" in last and str(tmp_path / "hf" / "hub") in last


def test_config_only_folder_is_a_clear_error(tmp_path, tiny_checkpoint):
    (tmp_path / "c").mkdir()
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "c" / "config.json")
    with pytest.raises(WeightsError, match="no weights in"):
        Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_type"] == "idefics3"
