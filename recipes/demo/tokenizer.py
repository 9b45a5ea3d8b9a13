"""A byte-level BPE tokenizer in SmolVLM's layout, trained with the `tokenizers` library on given text.

The special and image tokens come first and are added tokens, as in SmolVLM's tokenizer:
`<|endoftext|>` 0, `<|im_start|>` 1, `<|im_end|>` 2, `<global-img>`, `<row_r_col_c>` (r, c = 1..6),
`<fake_token_around_image>`, `<image>`, `<end_of_utterance>`. The folder it writes (tokenizer.json,
tokenizer_config.json, chat_template.json) loads in our processor and in transformers alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_SPECIALS = (["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
                  + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"])


def train_tokenizer(texts: Iterable[str], vocab_size: int, folder: str | Path) -> dict[str, int]:
    """Train the BPE on `texts`, write the tokenizer files into `folder`; return the special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = BASE_SPECIALS + IMAGE_SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|im_start|>",
              "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "padding_side": "left", "model_max_length": 8192,
              "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
              "clean_up_tokenization_spaces": False, "processor_class": "Idefics3Processor",
              "tokenizer_class": "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT_TEMPLATE}, indent=2) + "\n")
    return {s: tok.token_to_id(s) for s in specials}


def write_image_processor_files(folder: str | Path, tile: int, longest_edge: int, image_seq_len: int) -> None:
    """preprocessor_config.json + processor_config.json in the 4.x Hub layout."""
    folder = Path(folder)
    pre = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
           "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"longest_edge": tile},
           "processor_class": "Idefics3Processor", "resample": 1, "rescale_factor": 1 / 255,
           "size": {"longest_edge": longest_edge}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    proc = {"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"}
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
