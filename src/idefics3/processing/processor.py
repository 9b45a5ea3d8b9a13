"""`Idefics3Processor`: text + images in, model inputs out; ids back to text.

It ties the pieces together the way transformers' `Idefics3Processor` (v5.24, PIL image processor) does:
images are arranged per sample (a flat list is spread over the samples by their `<image>` counts), each image
is resized and cut into tiles (image.py), each `<image>` placeholder is expanded into its tile markers and image
tokens (prompt.py), the expanded text is tokenized (tokenizer.py) and everything is returned as a `BatchFeature`.
Chat templates are rendered by chat_template.py.

Two deliberate differences from transformers 5.24, both restoring 4.x behaviour: `decode`/`batch_decode` collapse
the image expansions back into `<image>` (pass `collapse_image_tokens=False` for 5.24's plain decode), and an
`image_seq_len` passed to `__call__` is honoured (5.24 accepts it but expands with the configured value).
"""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..hub import resolve_model_path
from . import chat_template as templates
from .batch import BatchFeature
from .image import ImageSettings, preprocess
from .load import DEFAULT_TIMEOUT, default_max_pixels, is_image_like, load_image
from .prompt import ImageTokens, collapse_image_markers, count_placeholders, expand_prompts
from .tokenizer import Tokenizer, read_json

_IMAGE_KEYS = frozenset(ImageSettings.__dataclass_fields__)
_TOKENIZER_LOAD_KEYS = frozenset({"padding_side", "truncation_side", "model_max_length", "add_bos_token",
                                  "add_eos_token"})
_TEXT_KEYS = frozenset({"add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of",
                        "padding_side", "return_attention_mask", "return_token_type_ids"})


class Idefics3Processor:
    """Prepares prompts and images for Idefics3 / SmolVLM and decodes generated ids."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageSettings | None = None, image_seq_len: int = 169,
                 chat_template: str | dict[str, str] | None = None, max_pixels: int | None = -1,
                 load_timeout: float | None = DEFAULT_TIMEOUT, num_threads: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageSettings()
        self.image_seq_len = int(image_seq_len)
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.max_pixels = max_pixels  # -1: Pillow's MAX_IMAGE_PIXELS; None: no limit
        self.load_timeout = load_timeout
        self.num_threads = num_threads  # image work; None: the usable cores, at most 8
        self.tokens = ImageTokens()
        self.image_token, self.fake_image_token = self.tokens.image, self.tokens.fake_image
        self.global_image_token = self.tokens.global_image
        self.end_of_utterance_token = "<end_of_utterance>"
        tokenizer.add_special_tokens([self.fake_image_token, self.image_token, self.end_of_utterance_token])
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.fake_image_token_id = tokenizer.convert_tokens_to_ids(self.fake_image_token)
        self.end_of_utterance_token_id = tokenizer.convert_tokens_to_ids(self.end_of_utterance_token)

    # ------------------------------------------------------------------------------------------ settings

    size = property(lambda self: self.image_processor.size,
                    lambda self, value: self._set_image(size=value))
    max_image_size = property(lambda self: self.image_processor.max_image_size,
                              lambda self, value: self._set_image(max_image_size=value))
    do_image_splitting = property(lambda self: self.image_processor.do_image_splitting,
                                  lambda self, value: self._set_image(do_image_splitting=value))

    def _set_image(self, **changes: Any) -> None:
        self.image_processor = self.image_processor.updated(**changes)

    @classmethod
    def from_pretrained(cls, ref: str | Path, revision: str | None = None, **overrides: Any) -> Idefics3Processor:
        """Load from a checkpoint folder or Hub id; keyword overrides (e.g. `size={"longest_edge": 3*364}`,
        `do_image_splitting=False`, `image_seq_len`, `padding_side`, `chat_template`, `max_pixels`) win."""
        folder = resolve_model_path(ref, revision)
        valid = _IMAGE_KEYS | _TOKENIZER_LOAD_KEYS | {"image_seq_len", "chat_template", "max_pixels", "load_timeout",
                                                      "num_threads"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown from_pretrained option(s) {unknown}; valid: {sorted(valid)}")
        processor_config = read_json(folder / "processor_config.json")
        image_config = processor_config.get("image_processor")
        if not isinstance(image_config, dict):
            image_config = read_json(folder / "preprocessor_config.json") or None
        if image_config is None:
            raise FileNotFoundError(f"no image-processor settings in {folder}: expected preprocessor_config.json or "
                                    "processor_config.json with an 'image_processor' entry")
        image_config = {**image_config, **{k: v for k, v in overrides.items() if k in _IMAGE_KEYS}}
        tokenizer = Tokenizer.from_folder(folder, **{k: v for k, v in overrides.items() if k in _TOKENIZER_LOAD_KEYS})
        chat = overrides.get("chat_template") or templates.load_chat_template(folder, processor_config)
        return cls(tokenizer, ImageSettings.from_dict(image_config),
                   image_seq_len=overrides.get("image_seq_len", processor_config.get("image_seq_len", 169)),
                   chat_template=chat, max_pixels=overrides.get("max_pixels", -1),
                   load_timeout=overrides.get("load_timeout", DEFAULT_TIMEOUT),
                   num_threads=overrides.get("num_threads"))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the transformers 4.x layout: preprocessor_config.json, processor_config.json, the chat template
        (chat_template.json, or .jinja files when there are several) and the tokenizer files."""
        folder = Path(folder)
        self.tokenizer.save(folder)
        image_config = {**self.image_processor.to_dict(), "image_processor_type": "Idefics3ImageProcessor",
                        "processor_class": "Idefics3Processor"}
        processor_config = {"image_seq_len": self.image_seq_len, "processor_class": "Idefics3Processor"}
        for name, config in (("preprocessor_config.json", image_config), ("processor_config.json", processor_config)):
            (folder / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if isinstance(self.chat_template, str):
            (folder / "chat_template.json").write_text(
                json.dumps({"chat_template": self.chat_template}, indent=2, ensure_ascii=False) + "\n",
                encoding="utf-8")
        elif isinstance(self.chat_template, dict):
            for name, source in self.chat_template.items():
                relative = "chat_template.jinja" if name == "default" else f"additional_chat_templates/{name}.jinja"
                path = folder / relative
                path.parent.mkdir(exist_ok=True)
                path.write_text(source, encoding="utf-8")

    # ------------------------------------------------------------------------------------------ inputs

    @property
    def _pixel_limit(self) -> int | None:
        return default_max_pixels() if self.max_pixels == -1 else self.max_pixels

    def _fetch(self, images: Any) -> Any:
        """Load every path/URL/base64 entry of a (nested) image structure; images stay as they are."""
        if isinstance(images, (list, tuple)):
            return [self._fetch(item) for item in images]
        if isinstance(images, (str, Path, bytes)):
            return load_image(images, timeout=self.load_timeout, max_pixels=self.max_pixels)
        if is_image_like(images):
            return images
        raise TypeError(f"unsupported image input of type {type(images).__name__}; pass PIL images, numpy arrays, "
                        "torch tensors, file paths, URLs, data URIs or base64 strings")

    def _arrange(self, images: Any, texts: list[str] | None) -> list[list[Any]] | None:
        """Images as one list per sample (transformers' layout rules), or None when there are none."""
        if images is None or (isinstance(images, (list, tuple)) and not images):
            return None
        images = self._fetch(images)
        if is_image_like(images):
            return [[images]]
        if is_image_like(images[0]):
            if texts is None:
                return [list(images)]
            bounds = [0, *accumulate(count_placeholders(texts, self.tokens))]
            per_sample = [list(images[a:b]) for a, b in zip(bounds, bounds[1:])]
            return per_sample + ([list(images[bounds[-1]:])] if len(images) > bounds[-1] else [])
        if not all(isinstance(s, (list, tuple)) and all(is_image_like(i) for i in s) for s in images):
            raise TypeError("images must be an image, a list of images, or a list of lists of images (one per sample)")
        return [list(s) for s in images] if any(images) else None

    def _check_counts(self, texts: list[str] | None, images: list[list[Any]] | None) -> None:
        if texts is None:
            return
        in_text = count_placeholders(texts, self.tokens)
        given = [len(sample) for sample in images] if images is not None else [0] * len(texts)
        if sum(in_text) != sum(given):
            raise ValueError(f"the prompts hold {sum(in_text)} {self.image_token} placeholders in total but "
                             f"{sum(given)} images were given")
        if in_text != given:
            raise ValueError(f"each prompt needs as many images as {self.image_token} placeholders: found "
                             f"{in_text} placeholders and {given} images per sample")

    def process_images(self, images: list[list[Any]], **settings: Any) -> tuple[dict[str, Any], list[list[tuple]]]:
        """Per-sample image lists -> (pixel_values/pixel_attention_mask arrays, per-sample (rows, cols) grids)."""
        options = self.image_processor.updated(**settings) if settings else self.image_processor
        return preprocess(images, options, self._pixel_limit, self.num_threads)

    def __call__(self, text: str | list[str] | None = None, images: Any = None, return_tensors: str | None = None,
                 image_seq_len: int | None = None, images_kwargs: dict | None = None,
                 text_kwargs: dict | None = None, **kwargs: Any) -> BatchFeature:
        """Tokenize `text` with each `<image>` expanded, and turn `images` into pixel values.

        Text options: add_special_tokens (default True), padding (False/True/"longest"/"max_length"), truncation,
        max_length, pad_to_multiple_of, padding_side. Image options override the loaded settings for this call:
        do_image_splitting, size, max_image_size, ... `return_tensors`: None (lists/arrays), "pt" or "np"."""
        image_options = {**(images_kwargs or {}), **{k: v for k, v in kwargs.items() if k in _IMAGE_KEYS}}
        text_options = {**(text_kwargs or {}), **{k: v for k, v in kwargs.items() if k in _TEXT_KEYS}}
        unknown = sorted(set(kwargs) - _IMAGE_KEYS - _TEXT_KEYS)
        if unknown:
            raise TypeError(f"unknown processor option(s) {unknown}; text options: {sorted(_TEXT_KEYS)}, image "
                            f"options: {sorted(_IMAGE_KEYS)}")
        if text is None and images is None:
            raise ValueError("pass text=, images= or both")
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
            if texts is None or not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a list of strings")
        arranged = self._arrange(images, texts)
        self._check_counts(texts, arranged)
        data: dict[str, Any] = {}
        grids: list[list[tuple]] = [[] for _ in texts or []]
        if arranged is not None:
            pixels, grids = self.process_images(arranged, **image_options)
            data.update(pixels)
        if texts is not None:
            expanded = expand_prompts(texts, grids, image_seq_len or self.image_seq_len, self.tokens)
            text_options.setdefault("max_length", self.tokenizer.default_max_length)
            encoded = self.tokenizer(expanded, **text_options)
            self._check_image_tokens(expanded, encoded["input_ids"])
            data = {**encoded, **data}
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_image_tokens(self, expanded: list[str], input_ids: list[list[int]]) -> None:
        in_ids = [ids.count(self.image_token_id) for ids in input_ids]
        in_text = count_placeholders(expanded, self.tokens)
        if in_ids != in_text:
            raise ValueError(f"the tokenized prompts keep {in_ids} image tokens but the expanded text has {in_text}; "
                             "truncation cut into an image: raise max_length or disable truncation")

    # ------------------------------------------------------------------------------------------ chat & decode

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, tools: list | None = None,
                            documents: list | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, tokenize: bool = False,
                            return_tensors: str | None = None, return_dict: bool = False,
                            processor_kwargs: dict | None = None, **kwargs: Any) -> Any:
        """Render messages to a prompt string (or a list for a batch of conversations), as transformers does.

        With tokenize=True the prompt goes through the processor together with the images named in the messages
        (without a second BOS when the template writes one); returns input ids, or the BatchFeature with
        return_dict=True. Extra keyword arguments are template variables, or processor options if the template
        does not read them."""
        source = templates.resolve_chat_template(self.chat_template, chat_template)
        used = templates.template_variables(source)
        processor_kwargs = {**(processor_kwargs or {}), **{k: v for k, v in kwargs.items() if k not in used}}
        variables = {**self.tokenizer.special_tokens_map, **{k: v for k, v in kwargs.items() if k in used}}
        conversations, batched = templates.normalize_conversations(conversation)
        prompts = templates.render(conversations, source, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message, tools=tools, documents=documents,
                                   **variables)
        prompt: str | list[str] = prompts if batched else prompts[0]
        if not tokenize:
            return prompt
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            processor_kwargs["add_special_tokens"] = False
        images = processor_kwargs.pop("images", None)
        images = ([images] if not batched else images) if images else templates.collect_images(conversations)
        has_images = any(image is not None for sample in images for image in sample)
        out = self(text=prompt, images=images if has_images else None, return_tensors=return_tensors,
                   **processor_kwargs)
        return out if return_dict else out["input_ids"]

    def decode(self, ids: Any, skip_special_tokens: bool = False, collapse_image_tokens: bool = True,
               **kwargs: Any) -> str | list[str]:
        """Text of generated ids; tile markers of image expansions collapse back into `<image>`."""
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if not collapse_image_tokens:
            return text
        if isinstance(text, list):
            return [collapse_image_markers(t, self.image_token) for t in text]
        return collapse_image_markers(text, self.image_token)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, collapse_image_tokens: bool = True,
                     **kwargs: Any) -> list[str]:
        """`decode` for each sequence of a batch (a list of id lists or a 2-D tensor)."""
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [collapse_image_markers(t, self.image_token) for t in texts] if collapse_image_tokens else texts
