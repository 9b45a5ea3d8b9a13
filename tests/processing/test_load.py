"""load_image sources (paths, URLs, data URIs, base64, bytes, arrays), EXIF orientation, and bad-input errors."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefics3 import ImageLoadError, load_image
from idefics3.processing.load import to_rgb
from processing.processing_data import exif_rotated_jpeg, photo


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_load(src):
    from transformers.image_utils import load_image as ref_load_image

    return ref_load_image(src)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    rgba.save(folder / "rgba.png")
    (folder / "exif.jpg").write_bytes(exif_rotated_jpeg(120, 60, orientation=6))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all\n" * 10)
    good = exif_rotated_jpeg(200, 100, orientation=1)
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.png").write_bytes(png_bytes(photo(60, 40))[:60] + b"\x00garbage" * 50)
    return folder


@pytest.mark.parametrize("name", ["rgba.png", "exif.jpg"])
def test_paths_match_transformers_load_image(files, name):
    """Same pixels as transformers' load_image: EXIF orientation applied, alpha dropped by convert("RGB")."""
    ours = load_image(str(files / name))
    expected = reference_load(str(files / name))
    assert ours.mode == "RGB" and ours.size == expected.size
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_exif_orientation_is_applied(files):
    image = load_image(files / "exif.jpg")  # pathlib.Path works too
    assert image.size == (60, 120)  # orientation 6: rotated by 90 degrees


@pytest.mark.parametrize("form", ["base64", "data-uri", "data-uri-jpeg", "bytes"])
def test_encoded_sources(files, form):
    raw = (files / "exif.jpg").read_bytes()
    text = base64.b64encode(raw).decode()
    src = {"base64": text, "data-uri": f"data:image/png;base64,{text}",
           "data-uri-jpeg": f"data:image/jpeg;base64,{text}", "bytes": raw}[form]
    ours = load_image(src)
    assert np.array_equal(np.asarray(ours), np.asarray(reference_load(str(files / "exif.jpg"))))


def test_in_memory_sources():
    image = photo(30, 20)
    assert load_image(image).size == (30, 20)
    pixels = np.asarray(image)
    assert np.array_equal(np.asarray(load_image(pixels)), pixels)
    chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    assert np.array_equal(np.asarray(load_image(chw)), pixels)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/slow.png":
            time.sleep(0.6)
        if self.path in ("/photo.png", "/slow.png"):
            body = png_bytes(photo(32, 24))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except BrokenPipeError:  # the client gave up (timeout test)
                pass
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_url(server):
    image = load_image(f"{server}/photo.png", timeout=5)
    assert np.array_equal(np.asarray(image), np.asarray(photo(32, 24)))


def test_url_errors(server):
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        load_image(f"{server}/missing.png")
    with pytest.raises(ImageLoadError, match="timeout 0.2s"):
        load_image(f"{server}/slow.png", timeout=0.2)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("name", "message"), [
    ("empty.png", "empty file"),
    ("notes.txt", "not an image file"),
    ("truncated.jpg", "truncated or corrupt"),
    ("corrupt.png", "truncated or corrupt|could not be opened"),
])
def test_bad_files(files, name, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(str(files / name))


def test_bad_bytes_and_strings(files):
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(b"\x89PNG but not really" * 4)
    with pytest.raises(ImageLoadError, match="no such image file"):
        load_image(str(files / "no-such-image.png"))
    with pytest.raises(ImageLoadError, match="neither an existing file nor valid base64"):
        load_image("/tmp/nofolder/nosuchfileatall")
    with pytest.raises(ImageLoadError, match="neither an existing file nor valid base64"):
        load_image("data:image/png;base64,@@@@not-base64@@@@")
    with pytest.raises(ImageLoadError, match="not base64-encoded"):
        load_image("data:image/svg+xml,<svg></svg>")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(str(files))
    with pytest.raises(TypeError, match="cannot load an image from int"):
        load_image(42)


def test_pixel_limit_is_configurable(files):
    path = files / "exif.jpg"  # 120 x 60 = 7200 pixels
    with pytest.raises(ImageLoadError, match="7200 pixels, over the limit of 7199"):
        load_image(path, max_pixels=7199)
    assert load_image(path, max_pixels=7200).size == (60, 120)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """A small PNG file that declares 3000 x 3000 pixels is refused from its header, before decoding."""
    path = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(path, optimize=True)
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageLoadError, match="9000000 pixels, over the limit of 1000000 pixels"):
        load_image(path, max_pixels=1_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # the default limit follows Pillow's
    with pytest.raises(ImageLoadError, match=r"decompression bombs.*9000000 pixels"):
        load_image(path)


def test_zero_sized_and_unknown_mode_and_bad_arrays():
    with pytest.raises(ImageLoadError, match="zero-sized"):
        to_rgb(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageLoadError, match="zero-sized"):
        to_rgb(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="cannot convert image mode 'La'"):
        to_rgb(photo(8, 8).convert("La"))
    with pytest.raises(ImageLoadError, match="channel axis"):
        to_rgb(np.zeros((5, 6, 7), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="2 or 3 dimensions"):
        to_rgb(np.zeros((2, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="dtype"):
        to_rgb(np.zeros((8, 8, 3), dtype=np.complex64))
    with pytest.raises(TypeError, match="unsupported image type dict"):
        to_rgb({"not": "an image"})


def test_truncated_file_opened_lazily_fails_clearly(files):
    """A PIL image whose data is bad only shows it when decoded; the processor's conversion says so."""
    lazy = Image.open(Path(files / "truncated.jpg"))
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        to_rgb(lazy)
