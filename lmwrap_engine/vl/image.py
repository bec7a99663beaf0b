"""``load_image``: a PIL image from a PIL image, an http(s) URL, a ``data:`` URL or a local path, as RGB.

Failures raise ``ImageLoadError`` naming the source (lmdeploy substituted a blank image; we don't).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import time
from typing import Union

DEFAULT_TIMEOUT = 10.0            # seconds for a whole http(s) download
DEFAULT_MAX_BYTES = 64 << 20      # largest encoded image accepted from a URL, a data: URL or a file


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names its source."""


def _name(source: str) -> str:
    return source if len(source) <= 80 else source[:60] + f"...({len(source)} chars)"


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    import requests
    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, stream=True, timeout=timeout) as resp:
            if resp.status_code != 200:
                raise ImageLoadError(f"cannot load image {_name(url)}: HTTP {resp.status_code}")
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(f"cannot load image {_name(url)}: {int(length)} bytes is more than the "
                                     f"{max_bytes}-byte limit")
            data = bytearray()
            for chunk in resp.iter_content(65536):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageLoadError(f"cannot load image {_name(url)}: more than the {max_bytes}-byte limit")
                if time.monotonic() > deadline:
                    raise ImageLoadError(f"cannot load image {_name(url)}: download took more than {timeout:g} s")
            return bytes(data)
    except requests.Timeout:
        raise ImageLoadError(f"cannot load image {_name(url)}: timed out after {timeout:g} s") from None
    except requests.RequestException as exc:
        raise ImageLoadError(f"cannot load image {_name(url)}: {type(exc).__name__}: {exc}") from None


def _read_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ImageLoadError(f"cannot load image {_name(url)}: a data URL must be 'data:image/...;base64,<data>'")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageLoadError(f"cannot load image {_name(url)}: more than the {max_bytes}-byte limit")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(f"cannot load image {_name(url)}: bad base64 ({exc})") from None


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageLoadError(f"cannot load image {_name(path)}: {size} bytes is more than the "
                                 f"{max_bytes}-byte limit")
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageLoadError(f"cannot load image {_name(path)}: {exc.strerror or exc}") from None


def load_image(image: Union[str, "os.PathLike", "PIL.Image.Image"], timeout: float = DEFAULT_TIMEOUT,  # noqa: F821
               max_bytes: int = DEFAULT_MAX_BYTES):
    """A ``PIL.Image`` in RGB from a PIL image, an ``http(s)://`` URL (``timeout`` seconds for the whole
    download, at most ``max_bytes``), a ``data:image/...;base64,`` URL or a local path (``file://`` too).

    Raises ``ImageLoadError`` (a ``ValueError``) naming the source when it cannot be read or is not an image.
    """
    from PIL import Image, UnidentifiedImageError
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        raise ImageLoadError(f"an image must be a PIL image, a URL or a path, got {type(image).__name__}")
    source = image
    if source.startswith(("http://", "https://")):
        data = _read_url(source, timeout, max_bytes)
    elif source.startswith("data:"):
        data = _read_data_url(source, max_bytes)
    else:
        data = _read_file(source[len("file://"):] if source.startswith("file://") else source, max_bytes)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise ImageLoadError(f"cannot load image {_name(source)}: not a readable image "
                             f"({type(exc).__name__}: {exc})") from None
    return img.convert("RGB")


def load_image_from_url(url: str, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES):
    """lmdeploy's older name for ``load_image``."""
    return load_image(url, timeout, max_bytes)
