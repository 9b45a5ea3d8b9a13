"""fp32 and bf16 logits against transformers 5.24.0 on tiny random checkpoints, across the feature matrix."""

from __future__ import annotations

import pytest
import torch

from checkpoints import SMOLVLM_IMAGE_TOKEN, build_hf_model, save_checkpoint, tiny_config
from idefics3 import Idefics3ForConditionalGeneration
from inputs import assert_close, pixels, prompt

IMG = SMOLVLM_IMAGE_TOKEN


def load_pair(tmp_path, cfg: dict, dtype: torch.dtype = torch.float32, layout: str = "5.x"):
    hf = build_hf_model(cfg)
    folder = save_checkpoint(hf, tmp_path / "ckpt", layout=layout, processor=False)
    ours = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return hf.to(dtype), ours


def compare(hf, ours, rel: float = 1e-4, **inputs) -> None:
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = ours(**inputs).logits
    mask = inputs.get("attention_mask")
    if mask is not None:  # padded positions carry no meaning
        ref, got = ref[mask.bool()], got[mask.bool()]
    assert_close(got, ref, rel)


def test_text_only(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    compare(hf, ours, input_ids=prompt([0, 0], 4))


def test_one_image(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    compare(hf, ours, input_ids=prompt([1], 4), pixel_values=pixels(1, [1], 32))


def test_several_images_one_sample(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    compare(hf, ours, input_ids=prompt([3], 4), pixel_values=pixels(1, [3], 32))


def test_batch_with_padding_frames_and_left_padding(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    ids = prompt([1, 3], 4)
    mask = torch.ones_like(ids)
    mask[0, :1] = 0  # row 0 is left padded by one token (its image block starts after it)
    compare(hf, ours, input_ids=ids, attention_mask=mask, pixel_values=pixels(2, [1, 3], 32))


def test_partially_valid_pixel_mask(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    pv = pixels(2, [2, 1], 32)
    pm = torch.zeros(2, 2, 32, 32, dtype=torch.long)
    pm[0, 0] = 1
    pm[0, 1, :16, :24] = 1  # an 8x12-style partial frame: bucketed position ids and key masking
    pv[0, 1, :, 16:, :] = 0
    pv[0, 1, :, :, 24:] = 0
    pm[1, 0, :20, :] = 1  # a frame whose valid part ends inside a patch row
    compare(hf, ours, input_ids=prompt([2, 1], 4), pixel_values=pv, pixel_attention_mask=pm)


def test_llama3_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = tiny_config(text={"rope_parameters": rope, "max_position_embeddings": 1024, "head_dim": 32,
                            "num_attention_heads": 2, "num_key_value_heads": 1})
    cfg["text_config"].pop("rope_theta")
    hf, ours = load_pair(tmp_path, cfg, layout="4.x")
    assert ours.config.text_config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(3, 1000, (1, 300))  # long enough to reach the scaled wavelengths
    compare(hf, ours, input_ids=ids)


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 1)])
def test_attention_heads(tmp_path, heads, kv):
    hf, ours = load_pair(tmp_path, tiny_config(text={"num_attention_heads": heads, "num_key_value_heads": kv}))
    compare(hf, ours, input_ids=prompt([1], 4), pixel_values=pixels(1, [1], 32))


def test_tied_embeddings(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config(tie_word_embeddings=True))
    assert ours.lm_head.weight is ours.model.text_model.embed_tokens.weight
    compare(hf, ours, input_ids=prompt([1], 4), pixel_values=pixels(1, [1], 32))


@pytest.mark.parametrize("image_size,patch,scale", [(24, 4, 3), (32, 4, 4), (27, 4, 2)])
def test_scale_factors_and_indivisible_image_size(tmp_path, image_size, patch, scale):
    # (27, 4): the patch size does not divide the image size (like 384/14): the last pixels go unused.
    cfg = tiny_config(vision={"image_size": image_size, "patch_size": patch}, scale_factor=scale)
    hf, ours = load_pair(tmp_path, cfg)
    seq = (image_size // patch) ** 2 // scale ** 2
    compare(hf, ours, input_ids=prompt([2], seq, length=2 * seq + 8), pixel_values=pixels(1, [2], image_size))


def test_bf16_close_to_transformers_bf16(tmp_path):
    """bf16 holds 8 bits of mantissa: two correct implementations that round in a different order
    (fused SDPA vs eager softmax, fp32 RMSNorm accumulations) differ by a few bf16 ulps per layer.
    We hold 3% of the logit scale, and require the argmax to agree on nearly every position."""
    hf, ours = load_pair(tmp_path, tiny_config(), dtype=torch.bfloat16)
    ids, pv = prompt([2], 4, length=40), pixels(1, [2], 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv.bfloat16()).logits
        got = ours(input_ids=ids, pixel_values=pv).logits
    assert got.dtype == torch.bfloat16
    assert_close(got, ref, 3e-2)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_image_token_count_mismatch_is_a_clear_error(tmp_path):
    _, ours = load_pair(tmp_path, tiny_config())
    ids = prompt([1], 4)
    with pytest.raises(ValueError, match=r"has 4 <image> tokens but the images give 8 \(2 frames x 4"):
        ours(ids, pixel_values=pixels(1, [2], 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_image_hidden_states_instead_of_pixels(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    ids, pv = prompt([1, 2], 4), pixels(2, [1, 2], 32)
    with torch.no_grad():
        feats = ours.get_image_features(pv)
        assert feats.shape == (3, 4, 64)  # the padding frame is dropped
        direct = ours(ids, pixel_values=pv).logits
        cached = ours(ids, image_hidden_states=feats).logits
    assert torch.equal(direct, cached)
    with pytest.raises(ValueError, match="not both"):
        ours(ids, pixel_values=pv, image_hidden_states=feats)


def test_loss_matches_transformers(tmp_path):
    hf, ours = load_pair(tmp_path, tiny_config())
    ids, pv = prompt([1], 4), pixels(1, [1], 32)
    labels = ids.clone()
    labels[ids == IMG] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv, labels=labels).loss
        got = ours(ids, pixel_values=pv, labels=labels).loss
    assert abs(ref.item() - got.item()) < 1e-5
