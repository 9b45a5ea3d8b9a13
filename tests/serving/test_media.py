"""load_image_url: data URIs, remote fetches against a local http.server (allow-list, redirects, status, slow and
oversized bodies), file:// confinement, and the MediaPolicy the server's flags build."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idefics3.processing.load import default_max_pixels
from idefics3.serving.media import MAX_REDIRECTS, MediaError, MediaPolicy, _host_allowed, load_image_url


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


PIXELS = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
IMAGE = Image.fromarray(PIXELS)
PNG = encoded(IMAGE, "PNG")
OPEN = MediaPolicy(allowed_domains=("127.0.0.1",))


# ---------------------------------------------------------------------------------------------- data: URIs

def test_png_data_uri_decodes_to_the_same_pixels():
    image = load_image_url(data_uri(PNG), MediaPolicy())
    assert image.mode == "RGB" and image.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(image), PIXELS)


def test_jpeg_data_uri_and_rgba_png_decode_to_rgb():
    jpeg = load_image_url(data_uri(encoded(IMAGE, "JPEG"), "image/jpeg"), MediaPolicy())
    assert jpeg.mode == "RGB" and jpeg.size == (32, 24)
    rgba = load_image_url(data_uri(encoded(IMAGE.convert("RGBA"), "PNG")), MediaPolicy())
    assert rgba.mode == "RGB"


@pytest.mark.parametrize("url, problem", [
    ("data:image/png;base64,iVBORw0K!!!!", "base64 data is invalid"),
    ("data:image/png;base64,iVBORw0KGgo", "base64 data is invalid"),  # bad padding
    ("data:image/png;base64,iVBO Rw0K", "base64 data is invalid"),  # no whitespace
    ("data:image/png;base64,", "holds no data"),
    ("data:image/png," + "x" * 20, "not base64-encoded"),
    (data_uri(PNG, "text/plain"), "'text/plain', not image/"),
    ("data:image/png;base64", "malformed data URI"),
])
def test_bad_data_uris_are_named(url, problem):
    with pytest.raises(MediaError, match=f"^image 3: .*{problem}"):
        load_image_url(url, MediaPolicy(), index=3)


def test_non_image_and_corrupt_payloads_are_media_errors():
    with pytest.raises(MediaError, match=r"^image 0: .*is not a PNG, JPEG, WEBP, GIF or BMP image"):
        load_image_url(data_uri(b"hello, this is not an image at all"), MediaPolicy())
    with pytest.raises(MediaError, match=r"^image 1: .*(truncated|corrupt|not an image)"):
        load_image_url(data_uri(PNG[: len(PNG) // 2]), MediaPolicy(), index=1)
    with pytest.raises(MediaError, match="not a PNG"):  # a format Pillow reads, but not one a request may send
        load_image_url(data_uri(encoded(IMAGE, "TIFF"), "image/tiff"), MediaPolicy())


def test_data_uri_over_max_bytes_is_refused_before_and_after_decoding():
    with pytest.raises(MediaError, match=r"over the limit of 100 bytes"):
        load_image_url(data_uri(PNG), MediaPolicy(max_bytes=100))
    exact = MediaPolicy(max_bytes=len(PNG))
    assert load_image_url(data_uri(PNG), exact).size == (32, 24)
    with pytest.raises(MediaError, match=rf"{len(PNG)} bytes, over the limit of {len(PNG) - 1}"):
        load_image_url(data_uri(PNG), MediaPolicy(max_bytes=len(PNG) - 1))


def test_pixel_limit_comes_from_the_policy():
    assert MediaPolicy().max_pixels == default_max_pixels()
    with pytest.raises(MediaError, match=r"^image 0: .*768 pixels, over the limit of 100 pixels"):
        load_image_url(data_uri(PNG), MediaPolicy(max_pixels=100))


def test_huge_payloads_are_shortened_in_messages():
    url = "data:image/png;base64," + "A" * 200_000 + "!"
    with pytest.raises(MediaError) as caught:
        load_image_url(url, MediaPolicy())
    assert len(str(caught.value)) < 300
    with pytest.raises(MediaError) as caught:
        load_image_url("data:image/png;base64," + base64.b64encode(b"not an image" * 20_000).decode(), MediaPolicy())
    assert len(str(caught.value)) < 300 and "chars)" in str(caught.value)


@pytest.mark.parametrize("url, problem", [
    ("ftp://127.0.0.1/cat.png", "unsupported URL scheme 'ftp'"),
    ("gopher://example.com/", "unsupported URL scheme 'gopher'"),
    ("/etc/passwd", "is not a URL"),
    ("cat.png", "is not a URL"),
    ("", "URL is empty"),
    ("http:///cat.png", "names no host"),
    ("http://127.0.0.1:99999/cat.png", "malformed URL"),
])
def test_unknown_schemes_and_malformed_urls_are_named(url, problem):
    with pytest.raises(MediaError, match=f"^image 0: .*{problem}"):
        load_image_url(url, OPEN)


# ---------------------------------------------------------------------------------------------- http(s)

class Handler(http.server.BaseHTTPRequestHandler):
    """Routes for the fetch tests; `self.server.port` is the server's own port."""

    def log_message(self, format: str, *args: object) -> None:  # keep the test output quiet
        pass

    def send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        port = self.server.server_address[1]
        path = self.path
        if path in ("/cat.png", "/a%20cat.png?size=small"):
            self.send(200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, PNG)
        elif path == "/to-cat":
            self.send(302, {"Location": "/cat.png"})
        elif path.startswith("/hops/"):
            left = int(path.rsplit("/", 1)[1])
            self.send(301, {"Location": f"/hops/{left - 1}" if left else "/cat.png"})
        elif path == "/to-localhost":
            self.send(302, {"Location": f"http://localhost:{port}/cat.png"})
        elif path == "/to-ftp":
            self.send(307, {"Location": f"ftp://127.0.0.1:{port}/cat.png"})
        elif path == "/to-nowhere":
            self.send(302, {})
        elif path == "/text":
            body = b"<html>not found, but with status 200</html>"
            self.send(200, {"Content-Type": "text/html", "Content-Length": str(len(body))}, body)
        elif path == "/drip":  # headers at once, then a byte every 20 ms for up to 10 s
            self.send(200, {"Content-Type": "image/png"})
            self.trickle(PNG[:8] + b"\0" * 500)
        elif path == "/drip-headers":  # a never-ending header line, a byte every 20 ms
            self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
            self.trickle(b"a" * 500)
        elif path == "/huge":  # no Content-Length: the body ends when the connection closes
            self.send(200, {"Content-Type": "image/png"})
            try:
                for _ in range(64):
                    self.wfile.write(PNG[:8] + b"\0" * (64 * 2**10))
            except OSError:
                pass
        elif path == "/huge-declared":
            self.send(200, {"Content-Type": "image/png", "Content-Length": str(2**30)}, PNG)
        else:
            self.send(404, {"Content-Length": "0"})

    def trickle(self, data: bytes) -> None:
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:  # the client hung up, as it should
            pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 drops concurrent connects, which then retry after a second


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The base URL of a threaded http.server on 127.0.0.1 and a free port."""
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_remote_images_are_refused_by_default_naming_the_host_and_the_flag(server):
    with pytest.raises(MediaError, match=r"^image 2: remote images from '127\.0\.0\.1' are not allowed; start the "
                                         r"server with --allowed-media-domains 127\.0\.0\.1$"):
        load_image_url(f"{server}/cat.png", MediaPolicy(), index=2)
    with pytest.raises(MediaError, match=r"'evil\.com' are not allowed; it is not in --allowed-media-domains "
                                         r"\(example\.com\)"):
        load_image_url("https://EVIL.com/cat.png", MediaPolicy(allowed_domains=("example.com",)))


def test_allowed_host_is_fetched(server):
    image = load_image_url(f"{server}/cat.png", OPEN)
    np.testing.assert_array_equal(np.asarray(image), PIXELS)
    assert load_image_url(f"{server}/a cat.png?size=small", OPEN).size == (32, 24)  # the space is escaped


def test_redirects_on_the_same_host_are_followed_up_to_the_limit(server):
    assert load_image_url(f"{server}/to-cat", OPEN).size == (32, 24)
    assert load_image_url(f"{server}/hops/{MAX_REDIRECTS - 1}", OPEN).size == (32, 24)
    with pytest.raises(MediaError, match=f"more than {MAX_REDIRECTS} redirects"):
        load_image_url(f"{server}/hops/{MAX_REDIRECTS}", OPEN)


def test_redirects_to_another_host_or_scheme_are_refused(server):
    with pytest.raises(MediaError, match=r"^image 1: redirect to 'localhost' \(redirected from .*/to-localhost'\) "
                                         r"refused: 'localhost' is not in --allowed-media-domains \(127\.0\.0\.1\)"):
        load_image_url(f"{server}/to-localhost", OPEN, index=1)
    with pytest.raises(MediaError, match="only http and https are followed"):
        load_image_url(f"{server}/to-ftp", OPEN)
    with pytest.raises(MediaError, match="HTTP 302 without a Location header"):
        load_image_url(f"{server}/to-nowhere", OPEN)


def test_error_statuses_and_non_images_are_named(server):
    with pytest.raises(MediaError, match=r"^image 4: '127\.0\.0\.1' answered HTTP 404 Not Found for .*/missing\.png"):
        load_image_url(f"{server}/missing.png", OPEN, index=4)
    with pytest.raises(MediaError, match=r"/text' is not a PNG, JPEG"):
        load_image_url(f"{server}/text", OPEN)


def test_connection_and_tls_failures_are_media_errors(server):
    with pytest.raises(MediaError, match=r"^image 0: could not fetch 'http://127\.0\.0\.1:1/cat\.png'"):
        load_image_url("http://127.0.0.1:1/cat.png", OPEN)
    with pytest.raises(MediaError, match=r"^image 0: could not fetch 'https://.*SSL"):  # plain http on that port
        load_image_url(server.replace("http:", "https:") + "/cat.png", OPEN)


@pytest.mark.parametrize("route", ["drip", "drip-headers"])
def test_slow_drip_servers_are_cut_off_by_the_timeout(server, route):
    policy = MediaPolicy(allowed_domains=("127.0.0.1",), timeout=0.5)
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"took longer than the limit of 0\.5 s"):
        load_image_url(f"{server}/{route}", policy)
    assert time.monotonic() - start < 1.5


def test_bodies_past_max_bytes_are_cut_off_without_or_despite_content_length(server):
    policy = MediaPolicy(allowed_domains=("127.0.0.1",), max_bytes=100_000)
    with pytest.raises(MediaError, match=r"/huge' is over the limit of 100000 bytes per image$"):
        load_image_url(f"{server}/huge", policy)
    with pytest.raises(MediaError, match=f"is {2**30} bytes, over the limit of 100000 bytes"):
        load_image_url(f"{server}/huge-declared", policy)


def test_concurrent_fetches_from_worker_threads(server):
    urls = [f"{server}/cat.png", f"{server}/to-cat", data_uri(PNG), f"{server}/missing.png"] * 4

    def fetch(index: int) -> object:
        try:
            return load_image_url(urls[index], OPEN, index=index).size
        except MediaError as err:
            return str(err)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(fetch, range(len(urls))))
    for index, result in enumerate(results):
        assert result == (32, 24) if index % 4 != 3 else result.startswith(f"image {index}: ")


# ---------------------------------------------------------------------------------------------- file://

@pytest.fixture
def media(tmp_path: Path) -> Path:
    """tmp/media/cat.png, tmp/media/sub/a cat.png and tmp/secret.png (outside the allowed directory)."""
    folder = tmp_path / "media"
    (folder / "sub").mkdir(parents=True)
    (folder / "cat.png").write_bytes(PNG)
    (folder / "sub" / "a cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return folder


def test_files_inside_the_allowed_directory_are_read(media):
    policy = MediaPolicy(allowed_local_path=media)
    assert load_image_url((media / "cat.png").as_uri(), policy).size == (32, 24)
    assert load_image_url((media / "sub" / "a cat.png").as_uri(), policy).size == (32, 24)  # %20 in the URL
    assert load_image_url(f"file://localhost{media}/cat.png", policy).size == (32, 24)
    (media / "link.png").symlink_to(media / "sub" / "a cat.png")
    assert load_image_url((media / "link.png").as_uri(), policy).size == (32, 24)


def test_files_outside_the_allowed_directory_are_refused(media):
    policy = MediaPolicy(allowed_local_path=media)
    (media / "escape.png").symlink_to(media.parent / "secret.png")
    for url in [(media.parent / "secret.png").as_uri(), f"file://{media}/../secret.png",
                f"file://{media}/sub/../../secret.png", (media / "escape.png").as_uri(), "file:///etc/passwd"]:
        with pytest.raises(MediaError, match=r"^image 5: .* lies outside the directory allowed by "
                                             r"--allowed-local-media-path$"):
            load_image_url(url, policy, index=5)


def test_allowed_directory_through_a_symlink_still_confines(media, tmp_path):
    (tmp_path / "alias").symlink_to(media)
    policy = MediaPolicy(allowed_local_path=tmp_path / "alias")
    assert policy.allowed_local_path == media.resolve()
    assert load_image_url(f"file://{tmp_path}/alias/cat.png", policy).size == (32, 24)
    with pytest.raises(MediaError, match="lies outside"):
        load_image_url(f"file://{tmp_path}/alias/../secret.png", policy)


def test_file_urls_need_the_flag(media):
    with pytest.raises(MediaError, match=r"^image 0: file:// images are not allowed; start the server with "
                                         r"--allowed-local-media-path"):
        load_image_url((media / "cat.png").as_uri(), MediaPolicy())


def test_missing_files_directories_fifos_and_remote_hosts_are_named(media):
    policy = MediaPolicy(allowed_local_path=media)
    with pytest.raises(MediaError, match=r"^image 0: no such file .*/nope\.png'$"):
        load_image_url((media / "nope.png").as_uri(), policy)
    with pytest.raises(MediaError, match="is not a regular file"):
        load_image_url((media / "sub").as_uri(), policy)
    if hasattr(os, "mkfifo"):
        os.mkfifo(media / "pipe.png")
        with pytest.raises(MediaError, match="is not a regular file"):  # and does not block waiting for a writer
            load_image_url((media / "pipe.png").as_uri(), policy)
    with pytest.raises(MediaError, match="names the host 'fileserver'"):
        load_image_url("file://fileserver/share/cat.png", policy)


def test_files_past_max_bytes_are_refused(media):
    policy = MediaPolicy(allowed_local_path=media, max_bytes=100)
    with pytest.raises(MediaError, match=f"is {len(PNG)} bytes, over the limit of 100 bytes"):
        load_image_url((media / "cat.png").as_uri(), policy)


# ---------------------------------------------------------------------------------------------- MediaPolicy

def test_policy_normalizes_and_checks_its_flags(tmp_path):
    policy = MediaPolicy(allowed_domains=["Example.COM.", " *.cdn.net ", "[::1]", "127.0.0.1"])
    assert policy.allowed_domains == ("example.com", "*.cdn.net", "::1", "127.0.0.1")
    for bad in ["https://example.com", "example.com:8080", "example.com/images", "*", "a.*.com", ""]:
        with pytest.raises(ValueError, match="is not a host name"):
            MediaPolicy(allowed_domains=(bad,))
    with pytest.raises(TypeError, match="not one string"):
        MediaPolicy(allowed_domains="example.com")
    with pytest.raises(ValueError, match="does not exist"):
        MediaPolicy(allowed_local_path=tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        MediaPolicy(allowed_local_path=tmp_path / "file")
    with pytest.raises(ValueError, match="timeout"):
        MediaPolicy(timeout=0)
    with pytest.raises(ValueError, match="max_bytes"):
        MediaPolicy(max_bytes=0)


def test_wildcard_entries_allow_subdomains_only():
    policy = MediaPolicy(allowed_domains=("*.example.com",))
    for url in ["http://example.com/x.png", "http://badexample.com/x.png", "http://example.com.evil.org/x.png",
                "http://example.com@evil.org/x.png"]:
        with pytest.raises(MediaError, match="are not allowed"):
            load_image_url(url, policy)
    assert _host_allowed("img.cdn.EXAMPLE.com.", policy.allowed_domains)  # no network: the check alone
