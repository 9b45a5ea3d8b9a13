"""The Idefics3 network: vision encoder -> connector -> image features merged into the Llama decoder -> head.

`Idefics3` holds `model` (vision_model, connector, text_model) and `lm_head`, so its parameter names are the
checkpoint's keys. One function, `embed`, turns token ids and images (pixels [B, N, 3, H, W] with
pixel_attention_mask [B, N, H, W], or precomputed features) into the decoder's input embeddings: `forward`,
the training loss (finetune/objective.py) and the generation engine's prefill all go through it, and one loss
function, `next_token_loss`, scores labelled next tokens for both `forward(labels=...)` and training. A
`KVCache` with a slot per row is how the generation engine steps sequences of different lengths together.

A text-only model (a GGUF text model loaded without its vision projector) has no vision weights: `TEXT_ONLY` in
the config's extra keys keeps the vision tower and connector on the meta device and out of `state_dict` and of
loading, and images raise a clear error instead of running an encoder without weights.

This is the plain network. What users load, `idefics3.Idefics3ForConditionalGeneration` (loading.py), is this
class plus the model card's conveniences: `from_pretrained` with a kernel backend, `generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import ANY, take_neutral
from ..config import Idefics3Config
from ..weights import LoadHooks, load_pretrained, save_pretrained
from .connector import Connector
from .kv_cache import KVCache
from .text import TextModel
from .vision import VisionTransformer

IGNORE_INDEX = -100  # a label that is not scored (prompt, image tokens, padding)
TEXT_ONLY = "text_only"  # config.extra key (config.json): the checkpoint has no vision tower or connector
_VISION_PREFIXES = ("model.vision_model.", "model.connector.")

# transformers' forward arguments that ask for what this forward does anyway (compat.py)
_NEUTRAL_FORWARD = {"return_dict": True, "use_cache": ANY, "output_attentions": False,
                    "output_hidden_states": False, "past_key_values": None, "cache_position": None}


@dataclass
class Idefics3Output:
    logits: torch.Tensor  # [B, T, V] (or the last logits_to_keep positions)
    loss: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None  # [N_frames, S_img, D_text]

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class Idefics3Model(nn.Module):
    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(config.vision_config)
        self.connector = Connector(config)
        self.text_model = TextModel(config.text_config)


def real_frames(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flatten [B, N, 3, H, W] to frames and drop the all-zero padding frames (batch-major order)."""
    if pixel_values.dim() == 4:  # already [N, 3, H, W]
        pixel_values = pixel_values[:, None]  # [N, 1, 3, H, W]
        pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[:, None]
    if pixel_values.dim() != 5:
        raise ValueError(f"pixel_values must be [batch, frames, channels, height, width], "
                         f"got shape {tuple(pixel_values.shape)}")
    frames = pixel_values.flatten(0, 1)  # [B*N, 3, H, W]
    real = (frames != 0).flatten(1).any(dim=1)  # [B*N]: a padding frame is all zeros
    mask = None
    if pixel_attention_mask is not None:
        mask = pixel_attention_mask.flatten(0, 1)  # [B*N, H, W]
    if bool(real.all()):
        return frames, mask
    return frames[real], None if mask is None else mask[real]


class Idefics3(nn.Module):
    """Token ids + images -> next-token logits [B, T, V] (see the module docstring)."""

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics3Model(config)
        t = config.text_config
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight
        self.checkpoint_dir: Path | None = None
        self.name_or_path: str = ""
        if config.extra.get(TEXT_ONLY):
            self.drop_vision()

    def drop_vision(self) -> None:
        """Make this a text-only model: the vision tower and connector go to the meta device (no weights) and
        leave state_dict and loading; images raise (see the module docstring). Recorded in the config."""
        self.config.extra[TEXT_ONLY] = True
        self.model.vision_model.to("meta")
        self.model.connector.to("meta")
        if getattr(self, "_text_only_hooks", None) is not None:
            return

        def drop_from_state(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
            for key in [k for k in state if k.startswith(tuple(prefix + p for p in _VISION_PREFIXES))]:
                del state[key]

        def forgive_missing(module: nn.Module, keys: Any) -> None:
            keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith(_VISION_PREFIXES)]

        self._text_only_hooks = (self.register_state_dict_post_hook(drop_from_state),
                                 self.register_load_state_dict_post_hook(forgive_missing))

    # ---- properties -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.text_model.norm.weight.device

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Idefics3:
        """What .to(), .float(), .cuda() run: a text-only model's absent vision tower and connector stay as
        they are (meta tensors cannot move to a device)."""
        if self.has_vision:
            return super()._apply(fn, recurse)
        modules = self.model._modules
        saved = dict(modules)
        for name in ("vision_model", "connector"):
            del modules[name]
        try:
            return super()._apply(fn, recurse)
        finally:
            modules.clear()
            modules.update(saved)

    @property
    def has_vision(self) -> bool:
        """False for a text-only model (no vision weights)."""
        return not self.model.vision_model.post_layernorm.weight.is_meta

    @property
    def dtype(self) -> torch.dtype:  # the final norm stays dense in every format, so it names the compute dtype
        return self.model.text_model.norm.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- pieces of the forward --------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor,
                           pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels [B, N, 3, H, W] -> image token embeddings [N_real, S_img, D_text] (padding frames dropped)."""
        if not self.has_vision:
            raise ValueError(f"{self.name_or_path or 'this model'} was loaded without its vision tower (no mmproj "
                             "file): it answers text only. To use images, load the model with its vision projector "
                             "(a GGUF text model with mmproj=<the mmproj .gguf file>)")
        frames, mask = real_frames(pixel_values, pixel_attention_mask)
        vision_dtype = self.model.vision_model.post_layernorm.weight.dtype
        patches = self.model.vision_model(frames.to(vision_dtype), mask)  # [N, S, D_vision]
        return self.model.connector(patches)  # [N, S/r², D_text]

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """Write the image features, in order, into the `<image>` positions of the embeddings."""
        is_image = input_ids == self.config.image_token_id  # [B, T]
        n_tokens = int(is_image.sum())
        n_features = image_features.numel() // image_features.shape[-1]
        if n_tokens != n_features:
            per = self.config.image_seq_len
            raise ValueError(
                f"the prompt has {n_tokens} <image> tokens but the images give {n_features} "
                f"({n_features // per} frames x {per} tokens per frame); each image tile must be expanded "
                f"to exactly {per} <image> tokens (use the processor)")
        features = image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)  # [K, D]
        return inputs_embeds.masked_scatter(is_image[..., None], features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_attention_mask: torch.Tensor | None = None,
              image_hidden_states: torch.Tensor | None = None, images_required: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's input: (embeddings [B, T, D] with the image features in place, the features or None).

        images_required: the prompt's `<image>` tokens need pixels or features (a cached decode step, whose
        images were merged when its prompt was prefilled, passes False)."""
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("pass either pixel_values or image_hidden_states, not both")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if pixel_values is not None:  # first: a text-only model says so before it meets ids it has no rows for
            image_hidden_states = self.get_image_features(pixel_values, pixel_attention_mask)
        embeds = self.model.text_model.embed_tokens(input_ids)  # [B, T, D]
        if image_hidden_states is not None:
            if isinstance(image_hidden_states, (list, tuple)):
                image_hidden_states = torch.cat(list(image_hidden_states), dim=0)  # [N, S, D]
            embeds = self.merge_image_features(input_ids, embeds, image_hidden_states)
        elif images_required and bool((input_ids == self.config.image_token_id).any()):
            raise ValueError("the prompt has <image> tokens but no pixel_values or image_hidden_states were given")
        return embeds, image_hidden_states

    def make_cache(self, max_batch: int, max_seq_len: int, zero: bool = True) -> KVCache:
        t = self.config.text_config
        return KVCache(t.num_hidden_layers, max_batch, max_seq_len, t.num_key_value_heads, t.head_dim,
                       self.dtype, self.device, zero)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None,
                image_hidden_states: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                cache_slots: torch.Tensor | None = None, logits_to_keep: int = 0,
                labels: torch.Tensor | None = None, kv_len: int | None = None, **transformers_args: Any
                ) -> Idefics3Output:
        """kv_len (cached calls): 1 + the largest position_ids value, if the caller knows it; it spares a
        device-to-host sync per step. transformers' neutral arguments (return_dict=True, use_cache, ...) are
        accepted; any other keyword raises, naming it."""
        take_neutral("forward", transformers_args, _NEUTRAL_FORWARD)
        embeds, image_hidden_states = self.embed(input_ids, pixel_values, pixel_attention_mask,
                                                 image_hidden_states, images_required=kv_cache is None)
        h = self.model.text_model(embeds, position_ids, attention_mask, kv_cache, cache_slots, kv_len)  # [B, T, D]
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # [B, T', V]
        loss = None
        if labels is not None:  # scored from the logits when they cover every position, not a second head pass
            loss = next_token_loss(h, labels, self.lm_head) if logits_to_keep else \
                next_token_loss(logits, labels, nn.Identity())
        return Idefics3Output(logits=logits, loss=loss, image_hidden_states=image_hidden_states)

    # ---- files ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, ref: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, revision: str | None = None,
                        hooks: Callable[[Any], LoadHooks | None] | None = None) -> Idefics3:
        """Load a checkpoint folder or Hub id: dtype a torch dtype, its name, or "auto" (the default: the
        dtype the checkpoint was saved in, fp32 on CPUs without bf16 instructions). hooks: see weights.LoadHooks
        (how quantisation takes part in loading)."""
        return load_pretrained(cls, ref, dtype, device, revision, hooks)

    def save_pretrained(self, folder: str | Path, max_shard_size: int | str | None = None) -> None:
        save_pretrained(self, folder, max_shard_size)


def next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32) of every labelled next token: hidden [B, T, D], labels [B, T] (IGNORE_INDEX where
    unscored). The head runs only at the labelled positions ([K, D] -> [K, V]), not over all B*T (pass logits
    with `nn.Identity()` as the head where they exist already).
    reduction: "mean" over the labelled tokens (forward's loss, as transformers) or "sum" (training divides by
    the labelled tokens of a whole optimiser step)."""
    targets = labels[:, 1:].to(hidden.device)  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    logits = head(hidden[:, :-1][keep])  # [K, V]
    return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)
