"""Image pipeline parity with transformers' Idefics3ImageProcessorPil: sizes, tiles, pixels, masks, padding."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from idefics3.processing.image import ImageSettings, grid_shape, longest_edge_size, preprocess
from processing.processing_data import document, exif_rotated_jpeg, gradient, image_modes, noise, photo

IDEFICS3 = {"size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364}}
SMOLVLM = {"size": {"longest_edge": 4 * 512}, "max_image_size": {"longest_edge": 512}}
CHEAP = {"size": {"longest_edge": 4 * 28}, "max_image_size": {"longest_edge": 28}}  # same math, tiny frames


def reference_processor(**settings):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(**settings)


def assert_same_as_reference(images, **settings):
    """Run both pipelines on a nested image list; pixels within 1e-6, masks and grids equal."""
    expected = reference_processor(**settings)(images=images, return_tensors="np", return_row_col_info=True)
    out, grids = preprocess(images, ImageSettings.from_dict(settings))
    assert out["pixel_values"].shape == expected["pixel_values"].shape
    assert out["pixel_values"].dtype == expected["pixel_values"].dtype
    assert np.abs(out["pixel_values"].astype(np.float64) - expected["pixel_values"]).max() <= 1e-6
    assert np.array_equal(out["pixel_attention_mask"], expected["pixel_attention_mask"])
    assert [[r for r, _ in g] for g in grids] == expected["rows"]
    assert [[c for _, c in g] for g in grids] == expected["cols"]
    return out, grids


# ---------------------------------------------------------------------------------------------- size math

@pytest.mark.parametrize("longest", [364, 512, 2 * 364, 3 * 512, 4 * 364, 5 * 512, 6 * 364, 12 * 364, 20 * 512])
def test_first_resize_size_matches_reference(longest):
    from transformers.models.idefics3 import image_processing_pil_idefics3 as ref

    shapes = [(1, 1), (7, 3000), (3000, 5), (3000, 4000), (4000, 3000), (364, 365), (365, 364), (100, 80),
              (2, 3), (999, 1001), (1, 5000), (5000, 1), (480, 640), (1080, 1920)]
    for height, width in shapes:
        h, w = ref._resize_output_size_rescale_to_max_len(height, width, max_len=longest)
        expected = ref._resize_output_size_scale_below_upper_bound(h, w, max_len=ref.MAX_IMAGE_SIZE)
        assert longest_edge_size(height, width, longest) == expected, (height, width)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 5), (30, 40), (41, 29), (28, 28), (29, 28)])
def test_grid_shape_matches_reference(n, shape):
    """Rows/cols from the size math alone equal the reference's rows/cols (tiny tiles keep this cheap)."""
    settings = {"size": {"longest_edge": n * 28}, "max_image_size": {"longest_edge": 28}}
    image = gradient(shape[1], shape[0])
    _, grids = assert_same_as_reference([[image]], **settings)
    assert grid_shape(shape[0], shape[1], ImageSettings.from_dict(settings)) == grids[0][0]


# ---------------------------------------------------------------------------------------------- pixels

CONTENT = {
    "photo": lambda: photo(480, 360),
    "document": lambda: document(300, 420),
    "noise": lambda: noise(200, 150),
    "1x1": lambda: Image.new("RGB", (1, 1), (10, 200, 30)),
    "7x3000": lambda: gradient(7, 3000),
    "3000x5": lambda: gradient(3000, 5),
    "exif-jpeg": lambda: Image.open(io.BytesIO(exif_rotated_jpeg())),
}


@pytest.mark.parametrize("name", list(CONTENT))
def test_content_images_match_reference(name):
    assert_same_as_reference([[CONTENT[name]()]], **IDEFICS3)


@pytest.mark.parametrize("name", ["photo", "document", "1x1", "3000x5"])
def test_content_images_match_reference_smolvlm(name):
    assert_same_as_reference([[CONTENT[name]()]], **SMOLVLM)


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("mode", list(image_modes()))
def test_every_pil_mode_matches_reference(mode, splitting):
    image = image_modes()[mode]
    assert image.mode == mode.split("+")[0]
    assert_same_as_reference([[image]], do_image_splitting=splitting, **CHEAP)


ARRAYS = {
    "numpy-uint8-hwc": lambda rng: rng.integers(0, 256, (30, 44, 3), dtype=np.uint8),
    "numpy-uint8-chw": lambda rng: rng.integers(0, 256, (3, 30, 44), dtype=np.uint8),
    "numpy-uint8-hw1": lambda rng: rng.integers(0, 256, (30, 44, 1), dtype=np.uint8),
    "numpy-uint8-rgba": lambda rng: rng.integers(0, 256, (30, 44, 4), dtype=np.uint8),
    "numpy-float-01": lambda rng: rng.random((30, 44, 3)).astype(np.float32),
    "numpy-float-rgba": lambda rng: rng.random((30, 44, 4)),
    "numpy-float-black-white": lambda rng: rng.integers(0, 2, (30, 44, 3)).astype(np.float32),
    "numpy-int64": lambda rng: rng.integers(0, 256, (30, 44, 3)),
    "torch-uint8-chw": lambda rng: torch.from_numpy(rng.integers(0, 256, (3, 30, 44), dtype=np.uint8)),
    "torch-float-chw": lambda rng: torch.from_numpy(rng.random((3, 30, 44)).astype(np.float32)),
}


@pytest.mark.parametrize("kind", list(ARRAYS))
def test_arrays_and_tensors_match_reference(kind):
    """Including the reference's float conventions (floats in [0, 1] are truncated to uint8 around resizes)."""
    assert_same_as_reference([[ARRAYS[kind](np.random.default_rng(5))]], **CHEAP)


KNOB_CASES = [(364, n, split) for n in (1, 2, 3, 4, 5) for split in (True, False)]
KNOB_CASES += [(512, 2, True), (512, 5, True), (512, 5, False)]


@pytest.mark.parametrize(("tile", "n", "splitting"), KNOB_CASES)
def test_resolution_knob_matches_reference(tile, n, splitting):
    """size={"longest_edge": N*tile}: N x N-ish grids plus the global image, or one square frame."""
    out, grids = assert_same_as_reference([[photo(160, 120)]], size={"longest_edge": n * tile},
                                          max_image_size={"longest_edge": tile}, do_image_splitting=splitting)
    rows, cols = grids[0][0]
    assert out["pixel_values"].shape[1] == (rows * cols + 1 if rows else 1)
    if splitting and n > 1:
        assert (rows, cols) == (math.ceil(n * 3 / 4), n)  # a 4:3 landscape photo


def test_batch_pads_with_zero_frames_and_masks():
    images = [[photo(90, 60), Image.new("RGB", (1, 1))], [noise(40, 80)], [], [document(50, 70)]]
    out, grids = assert_same_as_reference(images, **CHEAP)
    real = out["pixel_attention_mask"].any(axis=(2, 3)).sum(axis=1).tolist()
    assert real == [sum(r * c + 1 if r else 1 for r, c in sample) for sample in grids] == [30, 9, 0, 13]
    assert out["pixel_values"].shape[:2] == (4, 30)
    assert not out["pixel_values"][2].any() and not out["pixel_attention_mask"][2].any()


@pytest.mark.parametrize("changes", [
    {"do_rescale": False}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False},
    {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
    {"rescale_factor": 0.5 / 255}, {"do_resize": False}, {"resample": 3}, {"size": {"height": 50, "width": 30}},
], ids=lambda c: ",".join(c))
def test_setting_variants_match_reference(changes):
    images = [[photo(60, 45), noise(20, 33)], [gradient(33, 20)]]
    assert_same_as_reference(images, **{**CHEAP, **changes})


def test_thread_count_does_not_change_the_output():
    images = [[photo(90, 60), noise(30, 40)], [document(40, 60)], [gradient(7, 80)]]
    settings = ImageSettings.from_dict(CHEAP)
    single, grids = preprocess(images, settings, workers=1)
    for workers in (2, 5):
        out, more_grids = preprocess(images, settings, workers=workers)
        assert more_grids == grids
        assert all(np.array_equal(out[k], single[k]) for k in single)


def test_no_padding_returns_unpadded_frames():
    settings = {**CHEAP, "do_pad": False}
    expected = reference_processor(**settings)(images=[[photo(60, 45)]], return_tensors=None)
    out, _ = preprocess([[photo(60, 45)]], ImageSettings.from_dict(settings))
    assert "pixel_attention_mask" not in out
    assert all(np.array_equal(a, b) for a, b in zip(out["pixel_values"][0], expected["pixel_values"][0]))


def test_settings_reject_bad_sizes():
    with pytest.raises(ValueError, match="longest_edge"):
        ImageSettings(size={"shortest_edge": 10})
    with pytest.raises(ValueError, match="max_image_size"):
        ImageSettings(max_image_size={"height": 3, "width": 4})
    with pytest.raises(ValueError, match="positive"):
        ImageSettings(size={"longest_edge": 0})
    with pytest.raises(TypeError, match="unknown image setting"):
        ImageSettings().updated(do_splitting=True)
    assert ImageSettings(size=728).size == {"longest_edge": 728}
