"""Images from the URLs of chat content parts: ``data:`` URIs, local files, remote addresses.

A server must not fetch whatever address a client names, nor read whatever file: local files
are read only under ``--allowed-local-media-path`` and remote URLs only with
``--allow-remote-media`` (vLLM's flags). Every refusal and decoding failure is a ``MediaError``
(a ValueError) whose message says what was wrong, which the server answers with a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
"""Accepted media types and the Pillow format each must decode as."""
MAX_IMAGE_BYTES = 20 << 20
"""The most bytes one encoded image may have (remote downloads stop there)."""
REMOTE_TIMEOUT_S = 10.0


class MediaError(ValueError):
    """An image that cannot be used: refused, unreadable or not decodable."""


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from besides ``data:`` URIs."""

    allowed_local_media_path: Optional[str] = None
    """Directory whose files (``file://`` URLs) requests may name; None: no local files."""
    allow_remote_media: bool = False
    """Fetch ``http(s)://`` URLs (off: the server fetches nothing a client names)."""


def decode_image(data: bytes, expected_format: Optional[str] = None) -> Image.Image:
    """RGB image from encoded PNG, JPEG or WebP bytes; MediaError for anything else."""
    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(f"image has {len(data)} bytes, more than the {MAX_IMAGE_BYTES} accepted")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"image could not be decoded: {exc}") from None
    formats = set(MEDIA_TYPES.values())
    if image.format not in formats or (expected_format is not None and image.format != expected_format):
        raise MediaError(f"image is {image.format or 'of an unknown format'}, expected "
                         f"{expected_format or ', '.join(sorted(formats))}")
    return image.convert("RGB")


def load_image(url: str, policy: MediaPolicy) -> Image.Image:
    """The image an ``image_url`` names, under ``policy``."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        return _from_data_uri(url)
    if scheme == "file":
        return _from_file(unquote(urlparse(url).path), policy)
    if scheme in ("http", "https"):
        return _from_remote(url, policy)
    raise MediaError(f"image_url scheme {scheme or '(none)'!r} is not supported: send a data: URI "
                     f"(base64 PNG, JPEG or WebP), a file:// URL under --allowed-local-media-path, or "
                     f"an http(s) URL to a server started with --allow-remote-media")


def _from_data_uri(url: str) -> Image.Image:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError("data: URI has no ',' before its data")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower()
    if media_type not in MEDIA_TYPES:
        raise MediaError(f"media type {media_type or '(none)'!r} is not supported: use one of "
                         f"{', '.join(sorted(set(MEDIA_TYPES) - {'image/jpg'}))}")
    if "base64" not in params:
        raise MediaError("data: URI must be base64-encoded (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"data: URI is not valid base64: {exc}") from None
    return decode_image(data, MEDIA_TYPES[media_type])


def _from_file(path: str, policy: MediaPolicy) -> Image.Image:
    if policy.allowed_local_media_path is None:
        raise MediaError("local image files are not allowed: start the server with --allowed-local-media-path DIR")
    root = Path(policy.allowed_local_media_path).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise MediaError(f"image file {path} is outside --allowed-local-media-path {root}")
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise MediaError(f"image file {path} cannot be read: {exc.strerror}") from None
    return decode_image(data)


def _from_remote(url: str, policy: MediaPolicy) -> Image.Image:
    if not policy.allow_remote_media:
        raise MediaError("remote image URLs are not fetched: send the image as a data: URI, or start the server "
                         "with --allow-remote-media")
    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise MediaError(f"image at {url} is larger than {MAX_IMAGE_BYTES} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise MediaError(f"image at {url} could not be fetched: {exc}") from None
    return decode_image(b"".join(chunks))
