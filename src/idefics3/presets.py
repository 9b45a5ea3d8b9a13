"""The configurations of the released checkpoints, as their config.json files say (4.x Hub layout).

Used to build correctly shaped models without weights: benchmarks write random checkpoints of the real
shapes, and tests check that our parameter names and shapes equal transformers' for each of them.
Values follow the public config.json files of those checkpoints on the Hugging Face Hub.
"""

from __future__ import annotations

import copy

_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      patch_size=14, model_type="idefics3")
_SIGLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=512, patch_size=16, model_type="idefics3")



def _smolvlm_small(**text: int) -> dict:
    """SmolVLM-256M and -500M: the same SigLIP-B/16 tower, tokenizer and settings, two decoder sizes."""
    return dict(
        model_type="idefics3", scale_factor=4, image_token_id=49190, tie_word_embeddings=False,
        pad_token_id=128002, torch_dtype="bfloat16",
        vision_config=dict(_SIGLIP_B16),
        text_config=dict(vocab_size=49280, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         model_type="llama", **text))


PRESETS: dict[str, dict] = {
    "Idefics3-8B-Llama3": dict(
        model_type="idefics3", scale_factor=2, image_token_id=128257, tie_word_embeddings=False,
        pad_token_id=128002, torch_dtype="bfloat16",
        vision_config=dict(_SIGLIP_SO400M, image_size=364),
        text_config=dict(vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         max_position_embeddings=131072, bos_token_id=128000,
                         eos_token_id=[128001, 128008, 128009], pad_token_id=128002, model_type="llama")),
    "SmolVLM-256M-Instruct": _smolvlm_small(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                            num_attention_heads=9, num_key_value_heads=3),
    "SmolVLM-500M-Instruct": _smolvlm_small(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                            num_attention_heads=15, num_key_value_heads=5),
    "SmolVLM-Instruct": dict(
        model_type="idefics3", scale_factor=3, image_token_id=49153, tie_word_embeddings=False,
        pad_token_id=128002, torch_dtype="bfloat16",
        vision_config=dict(_SIGLIP_SO400M, image_size=384),
        text_config=dict(vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=273768.0,
                         max_position_embeddings=16384, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         model_type="llama")),
}


def preset(name: str) -> dict:
    """A deep copy of the named preset's config.json dict."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
