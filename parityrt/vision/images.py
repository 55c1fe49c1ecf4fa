"""Decoding the images a request names, as SGLang's image_data takes them: raw bytes, base64, a data URL
(data:image/...;base64,...), or a local file path. Every failure is an ImageError with a message fit for a 400."""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs before decoding them
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class ImageError(ValueError):
    """An image that cannot be used: unreadable, empty, or too large for the model's context."""


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    if not data:
        raise ImageError(f"{what}: empty image data")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # structure check without decoding the pixels
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageError(f"{what}: {image.width}x{image.height} pixels is more than {MAX_IMAGE_PIXELS}")
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{what}: cannot decode the image ({type(e).__name__}: {e})") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{what}: image of size {image.width}x{image.height} has no pixels")
    return image


def load_image(source: str | bytes | Image.Image, what: str = "image") -> Image.Image:
    """An image from bytes, a data URL, base64 text or a local path (tried in that order for text)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), what)
    if not isinstance(source, str):
        raise ImageError(f"{what}: expected a string (base64, data URL or path), got {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        raise ImageError(f"{what}: image URLs are not fetched (no network); send base64, a data URL or a local path")
    if m := _DATA_URL.match(source):
        return decode_image(_b64(source[m.end():], what), what)
    if source.startswith("data:"):
        raise ImageError(f"{what}: a data URL must be data:image/<type>;base64,<data>")
    if len(source) < 4096 and Path(source).expanduser().is_file():
        return decode_image(Path(source).expanduser().read_bytes(), what)
    return decode_image(_b64(source, what), what)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what}: neither a readable local file nor valid base64") from None
