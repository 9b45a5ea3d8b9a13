"""End-to-end processor parity (input_ids, attention_mask, pixel_values, pixel_attention_mask), layouts of
images over samples, config loading (4.x and 5.x layouts, overrides), saving, decoding, BatchFeature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idefics3 import BatchFeature, Idefics3Processor
from processing.processing_data import document, exif_rotated_jpeg, gradient, noise, photo

PROMPT = "<image>In this image, we see"


def assert_same(out, expected):
    assert list(out) == list(expected)
    for key in expected:
        a, b = out[key], expected[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if b.is_floating_point():
                assert (a - b).abs().max().item() <= 1e-6, key
            else:
                assert torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.abs(a.astype(np.float64) - b).max() <= 1e-6, key
        else:
            assert a == b, key


CASES = {
    "single": (PROMPT, lambda: photo(120, 90)),
    "no-split-size": (PROMPT, lambda: Image_1x1()),
    "two-images-one-prompt": ("<image>first<image>second", lambda: [photo(60, 45), document(40, 60)]),
    "batch-nested": (["<image>a", "b<image>c<image>", "<image>"],
                     lambda: [[noise(50, 40)], [gradient(7, 300), gradient(300, 5)], [photo(30, 30)]]),
    "batch-flat-list": (["<image>a", "b<image>c<image>"], lambda: [noise(50, 40), photo(20, 60), document()]),
    "batch-text-only-sample": (["<image>with image", "without image"], lambda: [photo(80, 60)]),
    "batch-empty-inner-list": (["<image>with image", "without image"], lambda: [[photo(80, 60)], []]),
}


def Image_1x1():  # noqa: N802 - reads as a constructor
    from PIL import Image

    return Image.new("RGB", (1, 1), (200, 10, 10))


TILE = {"idefics3": 364, "smolvlm": 512}


@pytest.mark.parametrize("folder_name", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(folders, reference, ours, folder_name, case):
    """The folder's own settings for single images; 2x2-tile images for the layouts (same code, less time)."""
    text, make_images = CASES[case]
    folder = folders[folder_name]
    overrides = {} if case in ("single", "no-split-size") else {"size": {"longest_edge": 2 * TILE[folder_name]}}
    kwargs = {"padding": True} if isinstance(text, list) else {}
    expected = reference(folder, **overrides)(text=text, images=make_images(), return_tensors="pt", **kwargs)
    assert_same(ours(folder, **overrides)(text=text, images=make_images(), return_tensors="pt", **kwargs), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_resolution_knob_end_to_end(folders, reference, ours, n):
    folder = folders["idefics3"]
    overrides = {"size": {"longest_edge": n * 364}}
    expected = reference(folder, **overrides)(text=PROMPT, images=photo(64, 48), return_tensors="pt")
    out = ours(folder, **overrides)(text=PROMPT, images=photo(64, 48), return_tensors="pt")
    assert_same(out, expected)
    rows, cols = (0, 0) if n == 1 else (int(np.ceil(n * 0.75)), n)
    assert out["pixel_values"].shape[1] == (rows * cols + 1 if rows else 1)
    tokens = (169 + 3) + rows * ((169 + 2) * cols + 1)  # the expansion, before the "\n\n" merge
    image_tokens = (out["input_ids"] == ours(folder).image_token_id).sum().item()
    assert image_tokens == 169 * (rows * cols + 1)
    assert tokens >= image_tokens


@pytest.mark.parametrize("folder_name", ["idefics3", "smolvlm"])
def test_no_splitting_and_call_options(folders, reference, ours, folder_name):
    folder = folders[folder_name]
    images = [photo(100, 50), noise(30, 90)]
    texts = ["<image>one", "two <image> and more words"]
    for kwargs in ({"do_image_splitting": False, "padding": True}, {"padding": "max_length", "max_length": 3000},
                   {"padding": True, "padding_side": "right", "size": {"longest_edge": 2 * TILE[folder_name]}},
                   {"padding": True, "add_special_tokens": False, "do_image_splitting": False}):
        expected = reference(folder)(text=texts, images=images, return_tensors="pt", **kwargs)
        assert_same(ours(folder)(text=texts, images=images, return_tensors="pt", **kwargs), expected)
    expected = reference(folder, do_image_splitting=False)(text=texts, images=images, padding=True)
    assert_same(ours(folder, do_image_splitting=False)(text=texts, images=images, padding=True), expected)


def test_return_types(folders, reference, ours):
    folder = folders["smolvlm"]
    options = {"do_image_splitting": False, "padding": True}
    for return_tensors in (None, "np"):
        expected = reference(folder)(text=["<image>x", "y"], images=[[photo(40, 30)], []],
                                     return_tensors=return_tensors, **options)
        assert_same(ours(folder)(text=["<image>x", "y"], images=[[photo(40, 30)], []],
                                 return_tensors=return_tensors, **options), expected)
    assert_same(ours(folder)(text="only text"), reference(folder)(text="only text"))
    images = [photo(40, 30), noise(9, 9)]
    assert_same(ours(folder)(images=images, return_tensors="pt", do_image_splitting=False),
                reference(folder)(images=images, return_tensors="pt", do_image_splitting=False))


def test_double_bos_is_reproduced(folders, reference, ours):
    """A rendered template (which writes BOS) through processor(text=...) gets a second BOS, as in transformers."""
    folder = folders["idefics3"]
    prompt = ours(folder).apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": "Hi"}]}],
                                              add_generation_prompt=True)
    out = ours(folder)(text=prompt, images=photo(30, 20), return_tensors="pt")
    assert_same(out, reference(folder)(text=prompt, images=photo(30, 20), return_tensors="pt"))
    bos = ours(folder).tokenizer.bos_token_id
    assert out["input_ids"][0, :2].tolist() == [bos, bos]


def test_image_seq_len_from_config_and_call(folders, ours):
    smol = ours(folders["smolvlm"])
    assert smol.image_seq_len == 64 and ours(folders["idefics3"]).image_seq_len == 169
    out = smol(text=PROMPT, images=Image_1x1(), do_image_splitting=False)
    assert out["input_ids"][0].count(smol.image_token_id) == 64
    out = smol(text=PROMPT, images=Image_1x1(), do_image_splitting=False, image_seq_len=4)
    assert out["input_ids"][0].count(smol.image_token_id) == 4


def test_count_mismatch_errors_give_both_counts(folders, ours):
    processor = ours(folders["smolvlm"])
    with pytest.raises(ValueError, match="2 <image> placeholders in total but 1 images"):
        processor(text="<image><image>", images=[photo(20, 20)])
    with pytest.raises(ValueError, match="1 <image> placeholders in total but 2 images"):
        processor(text="<image>", images=[photo(20, 20), photo(20, 20)])
    with pytest.raises(ValueError, match=r"found \[1, 0\] placeholders and \[0, 1\] images per sample"):
        processor(text=["<image>", "none"], images=[[], [photo(20, 20)]])
    with pytest.raises(ValueError, match="1 <image> placeholders in total but 0 images"):
        processor(text="<image>")
    with pytest.raises(ValueError, match="pass text=, images= or both"):
        processor()
    with pytest.raises(TypeError, match="string or a list of strings"):
        processor(text=[1, 2])
    with pytest.raises(TypeError, match="unknown processor option"):
        processor(text="x", do_splitting=False)
    with pytest.raises(ValueError, match="truncation cut into an image"):
        processor(text=PROMPT, images=photo(20, 20), truncation=True, max_length=10)
    with pytest.raises(ValueError, match="rows have different lengths"):
        processor(text=["a", "a b c d"], return_tensors="pt")


def test_bad_images_through_the_processor(folders, ours, tmp_path):
    processor = ours(folders["smolvlm"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match="bad.png"):
        processor(text=PROMPT, images=str(tmp_path / "bad.png"))
    with pytest.raises(TypeError, match="unsupported image input of type int"):
        processor(text=PROMPT, images=3)
    limited = Idefics3Processor.from_pretrained(folders["smolvlm"], max_pixels=100)
    with pytest.raises(ValueError, match="over the limit of 100 pixels"):
        limited(text=PROMPT, images=photo(20, 20))


def test_images_from_paths_and_base64(folders, reference, ours, tmp_path):
    import base64
    import io

    path = tmp_path / "photo.png"
    photo(70, 50).save(path)
    buffer = io.BytesIO()
    document(40, 50).save(buffer, format="PNG")
    encoded = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(exif_rotated_jpeg(90, 40, orientation=8))
    folder = folders["idefics3"]
    sources = [str(path), encoded, str(rotated)]
    expected = reference(folder)(text="<image>" * 3, images=sources, return_tensors="pt")
    assert_same(ours(folder)(text="<image>" * 3, images=sources, return_tensors="pt"), expected)


# ---------------------------------------------------------------------------------------------- loading & saving

def test_config_layouts_and_overrides(folders, v5_folder, ours):
    smol4, smol5 = ours(folders["smolvlm"]), ours(v5_folder)
    assert smol4.image_processor == smol5.image_processor
    assert smol4.size == {"longest_edge": 2048} and smol4.max_image_size == {"longest_edge": 512}
    assert smol4.do_image_splitting and smol4.chat_template == smol5.chat_template
    out4 = smol4(text=PROMPT, images=photo(50, 40), return_tensors="pt")
    assert_same(smol5(text=PROMPT, images=photo(50, 40), return_tensors="pt"), out4)
    custom = Idefics3Processor.from_pretrained(v5_folder, size={"longest_edge": 3 * 512}, do_image_splitting=False,
                                               image_seq_len=16, padding_side="right")
    assert custom.size == {"longest_edge": 1536} and not custom.do_image_splitting
    assert custom.image_seq_len == 16 and custom.tokenizer.padding_side == "right"
    with pytest.raises(TypeError, match="unknown from_pretrained option"):
        Idefics3Processor.from_pretrained(v5_folder, do_splitting=False)


def test_missing_image_config_is_a_clear_error(tmp_path, folders):
    import shutil

    shutil.copy(folders["smolvlm"] / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Idefics3Processor.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(tmp_path, folders, ours, reference):
    from transformers import Idefics3Processor as Reference

    for name, folder in folders.items():
        target = tmp_path / name
        ours(folder).save_pretrained(target)
        assert {p.name for p in target.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                      "preprocessor_config.json", "processor_config.json",
                                                      "chat_template.json"}
        images, text = [photo(40, 30), noise(20, 20)], ["<image>a", "b <image>"]
        options = {"padding": True, "return_tensors": "pt", "do_image_splitting": False}
        expected = reference(folder)(text=text, images=images, **options)
        assert_same(Idefics3Processor.from_pretrained(target)(text=text, images=images, **options), expected)
        reloaded = Reference.from_pretrained(str(target), backend="pil")
        assert reloaded.image_processor.to_dict() == reference(folder).image_processor.to_dict()
        assert_same(reloaded(text=text, images=images, **options), expected)
        chat = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        assert reloaded.apply_chat_template(chat) == ours(folder).apply_chat_template(chat)


# ---------------------------------------------------------------------------------------------- decoding & outputs

def test_decode_collapses_image_expansions(folders, reference, ours):
    for name, folder in folders.items():
        processor = ours(folder)
        out = processor(text=["Look: <image> done", "x"], images=[photo(60, 40)], padding=True)
        for skip in (True, False):
            plain = reference(folder).batch_decode(out["input_ids"], skip_special_tokens=skip)
            assert processor.batch_decode(out["input_ids"], skip_special_tokens=skip,
                                          collapse_image_tokens=False) == plain
            collapsed = processor.batch_decode(out["input_ids"], skip_special_tokens=skip)
            assert collapsed[0] == processor.decode(out["input_ids"][0], skip_special_tokens=skip)
            assert "<row_" not in collapsed[0] and "<global-img>" not in collapsed[0]
        if name == "idefics3":  # markers are plain text there, so they survive skip_special_tokens
            assert processor.decode(out["input_ids"][0], skip_special_tokens=True) == "Look: <image> done"


def test_batch_feature():
    features = BatchFeature({"input_ids": [[1, 2], [3, 4]], "pixel_values": np.ones((2, 1, 3, 4, 4), np.float32)},
                            tensor_type="pt")
    assert features.input_ids.dtype == torch.int64 and features.pixel_values.dtype == torch.float32
    features.to(torch.bfloat16)
    assert features.pixel_values.dtype == torch.bfloat16 and features.input_ids.dtype == torch.int64
    features.to("cpu")
    assert features["input_ids"].device.type == "cpu"

    def model(input_ids, pixel_values):
        return input_ids.shape, pixel_values.shape

    assert model(**features) == (torch.Size([2, 2]), torch.Size([2, 1, 3, 4, 4]))
    with pytest.raises(AttributeError, match="no field 'labels'"):
        _ = features.labels
    with pytest.raises(ValueError, match="return_tensors must be one of"):
        BatchFeature({"input_ids": [[1]]}, tensor_type="tf")


def test_same_lazily_opened_file_twice_in_one_call(smolvlm_folder, tmp_path):
    """One PIL object used for two placeholders must not be decoded by two threads at once."""
    import numpy as np
    from PIL import Image

    from idefics3 import Idefics3Processor

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    processor = Idefics3Processor.from_pretrained(smolvlm_folder, size={"longest_edge": 1024})
    separate = processor(text="<image><image>hi", images=[Image.open(path), Image.open(path)], return_tensors="pt")
    for _ in range(5):
        shared = Image.open(path)
        out = processor(text="<image><image>hi", images=[shared, shared], return_tensors="pt")
        assert (out["pixel_values"] == separate["pixel_values"]).all()
        assert (out["input_ids"] == separate["input_ids"]).all()
