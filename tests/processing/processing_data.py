"""Test-time checkpoint folders and images for the processing tests (no downloads).

`make_llama3_folder` builds an Idefics3-8B-like processor folder: a small byte-level BPE tokenizer laid out like
Llama 3 (BOS `<|begin_of_text|>` added by a TemplateProcessing post-processor, added tokens
`<fake_token_around_image>`, `<image>`, `<end_of_utterance>` after the vocabulary, while `<global-img>` and
`<row_i_col_j>` are plain text), the Idefics3 chat template and the 364/1456 image settings.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The real SmolVLM processor files, vendored in the repository (tests/data/smolvlm-tokenizer, see its README).
SMOLVLM_FOLDER = Path(__file__).resolve().parents[1] / "data" / "smolvlm-tokenizer"

IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
CORPUS = [
    "In this image, we see the Statue of Liberty, which is located on Liberty Island in New York.",
    "What do these images show? The first image shows a dog running on the beach at sunset.",
    "User: And who is that?\n\nAssistant: That is a famous landmark.\n\n",
    "<row_1_col_1><row_1_col_2><row_2_col_1><global-img> 0123456789 tiles rows cols image global",
    "A document with a table: name, value, 42, 3.14, total. Hello world! It's a test; isn't it?",
] * 20


def make_llama3_folder(folder: Path) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials + IMAGE_TOKENS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in specials + IMAGE_TOKENS}
    config = {"added_tokens_decoder": added, "additional_special_tokens": IMAGE_TOKENS,
              "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "pad_token": "<|reserved_special_token_0|>", "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "padding_side": "left", "processor_class": "Idefics3Processor",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    _write(folder / "tokenizer_config.json", config)
    _write(folder / "preprocessor_config.json", {
        "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"longest_edge": 364},
        "processor_class": "Idefics3Processor", "resample": 1, "rescale_factor": 1 / 255,
        "size": {"longest_edge": 1456}})
    _write(folder / "processor_config.json", {"image_seq_len": 169, "processor_class": "Idefics3Processor"})
    _write(folder / "chat_template.json", {"chat_template": IDEFICS3_TEMPLATE})
    return folder


def make_v5_layout(source: Path, folder: Path) -> Path:
    """The 5.x layout of `source`: processor_config.json with a nested image_processor, chat_template.jinja."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    image = json.loads((source / "preprocessor_config.json").read_text())
    processor = json.loads((source / "processor_config.json").read_text())
    _write(folder / "processor_config.json", {**processor, "image_processor": image})
    template = json.loads((source / "chat_template.json").read_text())["chat_template"]
    (folder / "chat_template.jinja").write_text(template)
    return folder


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------- images

def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def photo(width: int = 480, height: int = 360, seed: int = 0) -> Image.Image:
    """Something photo-like: a gradient sky, shapes, and a little noise."""
    rng = np.random.default_rng(seed)
    image = gradient(width, height)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.2, width * 0.45, height * 0.7), fill=(200, 60, 40))
    draw.rectangle((width * 0.55, height * 0.5, width * 0.9, height * 0.95), fill=(30, 120, 220))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def document(width: int = 300, height: int = 420) -> Image.Image:
    """A white page with rendered text lines and a table grid."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i in range(18):
        draw.text((12, 10 + 22 * i), f"Line {i}: the quick brown fox jumps over 13 lazy dogs.", fill=(10, 10, 10))
    for x in range(20, width, 70):
        draw.line((x, 300, x, height - 10), fill=(0, 0, 0))
    return image


def noise(width: int, height: int, seed: int = 1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def exif_rotated_jpeg(width: int = 120, height: int = 60, orientation: int = 6) -> bytes:
    """JPEG bytes whose EXIF orientation tag asks viewers to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo(width, height).save(buffer, format="JPEG", exif=exif, quality=90)
    return buffer.getvalue()


def image_modes() -> dict[str, Image.Image]:
    """One small image per PIL mode the processor must accept."""
    rng = np.random.default_rng(3)
    base = photo(96, 64)
    rgba = np.dstack([np.asarray(base), rng.integers(0, 256, (64, 96), dtype=np.uint8)])
    palette_transparent = base.convert("P")
    palette_transparent.info["transparency"] = 0
    return {
        "RGB": base, "RGBA": Image.fromarray(rgba, "RGBA"), "LA": base.convert("LA"),
        "P": base.convert("P"), "P+transparency": palette_transparent, "L": base.convert("L"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (64, 96)).astype(np.uint16)), "CMYK": base.convert("CMYK"),
        "1": base.convert("1"), "I": base.convert("I"), "F": base.convert("F"), "YCbCr": base.convert("YCbCr"),
    }
