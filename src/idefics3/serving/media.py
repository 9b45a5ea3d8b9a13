"""How the OpenAI-compatible server turns a chat request's `image_url.url` into a decoded PIL image, safely.

A request's image URL is untrusted input that can make the server read memory, disk and network on the
client's behalf, so everything is refused unless the operator opened it with a flag (see `MediaPolicy`):

- `data:image/<format>;base64,<data>`: always accepted. The base64 is validated strictly (no whitespace, no
  stray characters) and the size is checked before decoding.
- `http://` and `https://`: only from hosts in `--allowed-media-domains` (exact, case-insensitive host names;
  an entry `*.example.com` allows every subdomain of example.com, not example.com itself; any port). Redirects
  are followed by hand, at most `MAX_REDIRECTS`, and every hop is checked again: a redirect to another host or
  scheme is refused. The whole fetch (every hop, headers and body) has one deadline, enforced by a watchdog
  that shuts the socket down when it passes, so a server that drips bytes or headers cannot hold a worker.
  The body is read in chunks and cut off past `max_bytes` whatever Content-Length says. Connections go straight
  to the checked host with `http.client` (the transport under `urllib.request`, used directly to own the socket,
  to see every redirect and to keep environment proxies out of it). Host names are checked, not the addresses
  they resolve to: allowing a host that resolves to an internal address allows that address. Name resolution
  itself is bounded by the system resolver, not by the deadline.
- `file://`: only under `--allowed-local-media-path`. The path is resolved (`os.path.realpath`) and must lie in
  the resolved directory, so `..` and symlinks that lead out are refused. Only regular files are read (a FIFO or
  device cannot block or stream forever), and at most `max_bytes` of them.

The bytes must start with the signature of one of `IMAGE_FORMATS` (the formats OpenAI accepts, and BMP) before
Pillow sees them, which keeps its other decoders (PostScript through Ghostscript, for one) away from request
data; decoding is then `idefics3.processing.load.load_image`, with its pixel limit against decompression bombs.
Every failure is a `MediaError` (a ValueError) that names the image's position in the request and the problem,
with URLs shortened so a multi-megabyte data URI never lands in a message or log. Nothing here holds shared
mutable state, so `load_image_url` may be called from many worker threads at once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from idefics3.processing.load import ImageLoadError, default_max_pixels, load_image

MAX_REDIRECTS = 5
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

_CHUNK = 64 * 2**10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_DATA_URI = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),", re.IGNORECASE)
_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
# Characters left as they are when a URL's path and query are sent: all of RFC 3986's, and existing escapes.
_URL_SAFE = "/%:@!$&'()*+,;=-._~?"
_HEADERS = {"User-Agent": "idefics3-server", "Accept": "image/*", "Accept-Encoding": "identity",
            "Connection": "close"}


class MediaError(ValueError):
    """An image URL from a request that is refused or cannot be read or decoded; the message names the image."""


@dataclass(frozen=True)
class MediaPolicy:
    """What a request's image URLs may reach; the server's flags map onto these fields.

    allowed_domains: `--allowed-media-domains`, the hosts whose http(s) images may be fetched (exact names, or
        `*.example.com` for its subdomains); empty: remote images are refused.
    allowed_local_path: `--allowed-local-media-path`, the directory file:// images must lie in (resolved here, so
        a missing directory fails when the server starts, not on the first request); None: file:// is refused.
    timeout: seconds for a whole remote fetch, redirects included.
    max_bytes: the largest encoded image accepted, from any source.
    max_pixels: the largest width*height decoded (None: no limit); defaults to the processing default.
    """

    allowed_domains: tuple[str, ...] = ()
    allowed_local_path: Path | None = None
    timeout: float = 5.0
    max_bytes: int = 20 * 2**20
    max_pixels: int | None = field(default_factory=default_max_pixels)

    def __post_init__(self) -> None:
        if isinstance(self.allowed_domains, str):
            raise TypeError("allowed_domains is a sequence of host names, not one string")
        object.__setattr__(self, "allowed_domains", tuple(_normalize_domain(d) for d in self.allowed_domains))
        if self.allowed_local_path is not None:
            try:
                root = Path(self.allowed_local_path).expanduser().resolve(strict=True)
            except OSError as err:
                raise ValueError(f"allowed_local_path {str(self.allowed_local_path)!r} does not exist") from err
            if not root.is_dir():
                raise ValueError(f"allowed_local_path {str(root)!r} is not a directory")
            object.__setattr__(self, "allowed_local_path", root)
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not (isinstance(self.max_bytes, int) and self.max_bytes > 0):
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")


def _normalize_domain(entry: str) -> str:
    """A host name, `*.`-prefixed domain or IP address from the allow-list, lower-cased without a final dot."""
    host = str(entry).strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"allowed media domain {entry!r} is not a host name (give names like 'example.com' or "
                         "'*.example.com', without a scheme, port or path)")
    return host


def load_image_url(url: str, policy: MediaPolicy, index: int = 0) -> Image.Image:
    """The image behind a chat request's `image_url.url`, as an upright PIL "RGB" image.

    `index` is the image's position in the request; every MediaError message starts with "image {index}: ".
    """
    label = f"image {index}"
    if not isinstance(url, str):
        raise MediaError(f"{label}: the image URL must be a string, got {type(url).__name__}")
    url = url.strip()
    if not url:
        raise MediaError(f"{label}: the image URL is empty")
    scheme, colon, _ = url.partition(":")
    scheme = scheme.lower() if colon and _SCHEME.fullmatch(scheme) else ""
    if scheme == "data":
        data = _read_data_uri(url, policy, label)
    elif scheme in ("http", "https"):
        data = _fetch_remote(url, policy, label)
    elif scheme == "file":
        data = _read_file(url, policy, label)
    elif not scheme:
        raise MediaError(f"{label}: {_short(url)!r} is not a URL; pass a data:image/...;base64 URI, an http(s):// "
                         "URL or a file:// URL")
    else:
        raise MediaError(f"{label}: unsupported URL scheme {scheme!r} in {_short(url)!r}; pass a "
                         "data:image/...;base64 URI, an http(s):// URL or a file:// URL")
    return _decode(data, policy, label, url)


def _short(text: str, limit: int = 160) -> str:
    """`text`, or its start and end around the length when it is longer than `limit` (a data URI can be MBs)."""
    return text if len(text) <= limit else f"{text[:limit - 60]}...{text[-30:]} ({len(text)} chars)"


def _too_large(label: str, what: str, size: int | str | None, policy: MediaPolicy) -> MediaError:
    """The error for an image over max_bytes; `size` None when reading stopped at the limit."""
    over = "over" if size is None else f"{size} bytes, over"
    return MediaError(f"{label}: {what} is {over} the limit of {policy.max_bytes} bytes per image")


# ---------------------------------------------------------------------------------------------- data: URIs

def _read_data_uri(url: str, policy: MediaPolicy, label: str) -> bytes:
    match = _DATA_URI.match(url)
    if match is None:
        raise MediaError(f"{label}: malformed data URI {_short(url)!r}; expected data:image/<format>;base64,<data>")
    media_type = match["type"].strip().lower()
    if not media_type.startswith("image/"):
        raise MediaError(f"{label}: the data URI's media type is {media_type or 'missing'!r}, not image/<format>")
    if "base64" not in (p.strip().lower() for p in match["params"].split(";")):
        raise MediaError(f"{label}: the data URI is not base64-encoded; expected data:image/<format>;base64,<data>")
    payload = url[match.end():]
    if not payload:
        raise MediaError(f"{label}: the data URI holds no data")
    if len(payload) > 4 * math.ceil(policy.max_bytes / 3):  # more than max_bytes once decoded, if it decodes
        raise _too_large(label, "the data URI", f"about {len(payload) * 3 // 4}", policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"{label}: the data URI's base64 data is invalid ({err})") from err
    if len(data) > policy.max_bytes:
        raise _too_large(label, "the data URI", len(data), policy)
    return data


# ---------------------------------------------------------------------------------------------- http(s)

def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host.endswith(entry[1:]) if entry.startswith("*.") else host == entry for entry in allowed)


def _remote_parts(url: str, policy: MediaPolicy, label: str, redirected_from: str | None
                  ) -> urllib.parse.SplitResult:
    """The parsed URL of one hop, once its scheme and host are allowed."""
    via = f" (redirected from {_short(redirected_from)!r})" if redirected_from else ""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as err:
        raise MediaError(f"{label}: malformed URL {_short(url)!r}{via}: {err}") from err
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"{label}: redirect to {_short(url)!r} refused{via}: only http and https are followed")
    if not host:
        raise MediaError(f"{label}: malformed URL {_short(url)!r}{via}: it names no host")
    if not _host_allowed(host, policy.allowed_domains):
        if redirected_from:
            raise MediaError(f"{label}: redirect to {host!r}{via} refused: {host!r} is not in "
                             f"--allowed-media-domains ({', '.join(policy.allowed_domains)})")
        if not policy.allowed_domains:
            raise MediaError(f"{label}: remote images from {host!r} are not allowed; start the server with "
                             f"--allowed-media-domains {host}")
        raise MediaError(f"{label}: remote images from {host!r} are not allowed; it is not in "
                         f"--allowed-media-domains ({', '.join(policy.allowed_domains)})")
    return parts


def _fetch_remote(url: str, policy: MediaPolicy, label: str) -> bytes:
    """The body of a 200 answer for `url`, following at most MAX_REDIRECTS allowed redirects."""
    deadline = time.monotonic() + policy.timeout
    redirected_from = None
    for _ in range(MAX_REDIRECTS + 1):
        parts = _remote_parts(url, policy, label, redirected_from)
        status, reason, location, body = _get(parts, url, policy, deadline, label)
        if status == 200:
            return body
        if status not in _REDIRECT_STATUSES:
            raise MediaError(f"{label}: {parts.hostname!r} answered HTTP {status} {reason} for {_short(url)!r}")
        if not location:
            raise MediaError(f"{label}: {parts.hostname!r} answered HTTP {status} without a Location header for "
                             f"{_short(url)!r}")
        redirected_from, url = url, urllib.parse.urljoin(url, location.strip())
    raise MediaError(f"{label}: more than {MAX_REDIRECTS} redirects while fetching {_short(url)!r}")


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # verifies certificates and host names; safe to share across threads


def _get(parts: urllib.parse.SplitResult, url: str, policy: MediaPolicy, deadline: float, label: str
         ) -> tuple[int, str, str | None, bytes]:
    """One GET: (status, reason, Location header, body); the body is read only for a 200 answer."""
    timed_out = MediaError(f"{label}: fetching {_short(url)!r} took longer than the limit of {policy.timeout:g} s")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise timed_out
    if parts.scheme.lower() == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=remaining, context=_tls_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=remaining)
    expired = threading.Event()

    def cut_off() -> None:  # wakes a read blocked on a server that sends a byte now and then
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also for a TLS one
            except OSError:
                pass

    watchdog = threading.Timer(remaining, cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        target = urllib.parse.quote(parts.path or "/", safe=_URL_SAFE)
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe=_URL_SAFE)
        conn.request("GET", target, headers=_HEADERS)
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.reason, response.getheader("Location"), b""
        body = _read_body(response, policy, deadline, label, url)
        if expired.is_set():  # the watchdog's shutdown reads as the end of a body without Content-Length
            raise timed_out
        return response.status, response.reason, None, body
    except MediaError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        if expired.is_set() or isinstance(err, TimeoutError):
            raise timed_out from err
        raise MediaError(f"{label}: could not fetch {_short(url)!r}: {err or type(err).__name__}") from err
    finally:
        watchdog.cancel()
        watchdog.join()  # before close(), so the watchdog never shuts down a socket that is being closed
        conn.close()


def _read_body(response: http.client.HTTPResponse, policy: MediaPolicy, deadline: float, label: str,
               url: str) -> bytes:
    """The body, in chunks, checking the size and the deadline after each one."""
    what = f"the image at {_short(url)!r}"
    length = (response.getheader("Content-Length") or "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise _too_large(label, what, length, policy)
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(min(_CHUNK, policy.max_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > policy.max_bytes:
            raise _too_large(label, what, None, policy)
        if time.monotonic() > deadline:
            raise TimeoutError  # a server that drips the body: _get names the limit
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- file://

def _read_file(url: str, policy: MediaPolicy, label: str) -> bytes:
    root = policy.allowed_local_path
    if root is None:
        raise MediaError(f"{label}: file:// images are not allowed; start the server with "
                         "--allowed-local-media-path DIR to serve images from DIR")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"{label}: file URL {_short(url)!r} names the host {parts.netloc!r}; only local files "
                         "(file:///absolute/path) are read")
    path = urllib.request.url2pathname(parts.path)
    if not os.path.isabs(path):
        raise MediaError(f"{label}: file URL {_short(url)!r} has no absolute path")
    try:
        real = os.path.realpath(path)
        inside = os.path.commonpath([str(root), real]) == str(root)
    except ValueError as err:  # a NUL byte, or (Windows) another drive
        raise MediaError(f"{label}: malformed file URL {_short(url)!r}: {err}") from err
    if not inside:
        raise MediaError(f"{label}: {_short(url)!r} lies outside the directory allowed by "
                         "--allowed-local-media-path")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as err:
        raise MediaError(f"{label}: no such file {_short(url)!r}") from err
    except OSError as err:
        raise MediaError(f"{label}: cannot open {_short(url)!r}: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"{label}: {_short(url)!r} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise _too_large(label, f"the file {_short(url)!r}", info.st_size, policy)
        with open(fd, "rb", closefd=False) as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as err:
        raise MediaError(f"{label}: cannot read {_short(url)!r}: {err.strerror}") from err
    finally:
        os.close(fd)
    if len(data) > policy.max_bytes:
        raise _too_large(label, f"the file {_short(url)!r}", None, policy)
    return data


# ---------------------------------------------------------------------------------------------- decoding

def _image_format(data: bytes) -> str | None:
    """The one of IMAGE_FORMATS whose signature `data` starts with."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _decode(data: bytes, policy: MediaPolicy, label: str, url: str) -> Image.Image:
    source = f"{_short(url)!r}"
    if _image_format(data) is None:
        raise MediaError(f"{label}: {source} is not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} "
                         f"image ({len(data)} bytes starting {data[:8]!r})")
    try:
        return load_image(data, timeout=None, max_pixels=policy.max_pixels)
    except ImageLoadError as err:
        raise MediaError(f"{label}: {source}: {err}") from err
