"""The one random-checkpoint writer: the toy checkpoint runs the whole pipeline; the recipe's starting checkpoint
has the demo configuration."""

from __future__ import annotations

import json

from PIL import Image
from recipes.demo.random_checkpoint import main, make_random_checkpoint
from recipes.demo.recipe import init_checkpoint

from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]


def test_toy_checkpoint_loads_splits_its_example_and_generates(tmp_path):
    folder = make_random_checkpoint(tmp_path / "toy", seed=1)
    processor = Idefics3Processor.from_pretrained(folder)
    model = Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (4, 4, 2)
    image = Image.open(folder / "example.png")
    inputs = processor(text=processor.apply_chat_template(PROMPT, add_generation_prompt=True), images=[image],
                       return_tensors="pt")
    assert inputs["pixel_values"].shape[1] > 1  # larger than a 64-px tile: split, plus the global image
    out = model.generate(**inputs, max_new_tokens=4)
    prompt = inputs["input_ids"].shape[1]
    assert prompt < out.shape[1] <= prompt + 4  # random text, maybe ended early


def test_the_command_writes_the_same_folder_as_the_function(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["random_checkpoint", str(tmp_path / "cli"), "--seed", "1"])
    main()
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    make_random_checkpoint(tmp_path / "fn", seed=1)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "fn" / name).read_bytes(), name


def test_recipe_start_has_the_demo_configuration(tmp_path):
    texts = ["User:What colour is the circle?<end_of_utterance>\nAssistant: red<end_of_utterance>\n"] * 20
    folder = init_checkpoint(tmp_path / "init", texts, heads=6, kv_heads=6)
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 32 and config["text_config"]["hidden_size"] == 128
    assert config["text_config"]["num_attention_heads"] == config["text_config"]["num_key_value_heads"] == 6
    assert json.loads((folder / "generation_config.json").read_text())["max_new_tokens"] == 8
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"longest_edge": 128}
