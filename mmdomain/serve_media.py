"""OpenAI chat messages -> our conversation and media files, under the server's limits: ``data:`` URLs always;
http(s) and ``file://`` only under an allow-listed prefix; at most so many items, each within the pixel limit."""
from __future__ import annotations

import base64
import binascii
import io
import posixpath
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MmdomainError

# The media types a data: URL may carry, and the file extension our domains decode them by.
MEDIA_TYPES = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp", "image/bmp": ".bmp", "image/gif": ".gif",
    "image/tiff": ".tif", "application/dicom": ".dcm", "application/x-nifti": ".nii", "application/x-npy": ".npy",
    "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/flac": ".flac", "audio/mpeg": ".mp3", "audio/ogg": ".ogg",
}
AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}


class RequestRefused(MmdomainError, ValueError):
    """A request the server will not run; ``status`` is its HTTP status, ``param`` the request field, ``code`` the
    OpenAI-style error code (the message names the limit or field and the fix)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str = "invalid_request",
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it: ``allow_from`` prefixes (``https://host/path/`` or
    ``file:///dir/``) admit URLs besides ``data:``; ``max_items`` per request; ``max_pixels`` per image (width x height
    x frames, read from the header before any pixel is decoded); ``max_bytes`` per fetched file."""

    max_items: int = 8
    max_pixels: int = 25_000_000
    max_bytes: int = 20_000_000
    allow_from: tuple[str, ...] = field(default_factory=tuple)
    fetch_timeout_s: float = 10.0


@dataclass
class ParsedChat:
    conversation: list[dict[str, str]]
    """Turns with each media item written as its kind's marker."""
    files: list[tuple[str, bytes]]
    """(name, bytes) of each media item, in marker order, for the processor's domains to decode."""


def kind_tokens(processor: Any) -> dict[str, str]:
    """Which marker an ``image_url`` and an ``input_audio`` part become: image parts go to the first kind that takes
    images and is not an audio kind; audio parts to the first audio kind."""
    found: dict[str, str] = {}
    for kind in processor.kinds:
        names = {kind.name, *kind.aliases}
        if "audio" in names:
            found.setdefault("audio", kind.token)
        elif "image" in names or kind.name == "image":
            found.setdefault("image", kind.token)
    return found


def parse_messages(messages: Any, processor: Any, policy: MediaPolicy) -> ParsedChat:
    if not isinstance(messages, list) or not messages:
        raise RequestRefused("messages must be a non-empty list of {role, content}", param="messages")
    tokens = kind_tokens(processor)
    conversation: list[dict[str, str]] = []
    files: list[tuple[str, bytes]] = []
    for turn, message in enumerate(messages):
        where = f"messages[{turn}]"
        if not isinstance(message, dict):
            raise RequestRefused(f"{where} must be an object with role and content", param=where)
        role, content = message.get("role"), message.get("content")
        if role == "developer":  # the newer name of the system turn
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestRefused(f"{where}.role {role!r} must be system, user or assistant", param=f"{where}.role")
        if content is None or isinstance(content, str):
            conversation.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise RequestRefused(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        pieces = []
        for index, part in enumerate(content):
            at = f"{where}.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text") or ""
                if not isinstance(text, str):  # str() of an object would reach the model as its Python repr
                    raise RequestRefused(f"{at}.text must be a string, got {type(text).__name__}", param=f"{at}.text")
                pieces.append(text)
                continue
            if kind not in ("image_url", "input_audio", "audio_url"):
                raise RequestRefused(f"{at}: content part type {kind!r} is not text, image_url, input_audio or audio_url", param=at)
            media = "image" if kind == "image_url" else "audio"
            if media not in tokens:
                takes = " or ".join(sorted(tokens)) or "no media"
                raise RequestRefused(f"{at}: this model takes no {media} ({takes} only)", param=at)
            if role != "user":
                raise RequestRefused(f"{at}: media go in user turns only", param=at)
            if len(files) >= policy.max_items:
                raise RequestRefused(f"more than {policy.max_items} media items in one request (limit --max-media-items); send fewer",
                                     param=at, code="too_many_media_items")
            files.append(_read_part(part, kind, at, policy))
            pieces.append(tokens[media])
        conversation.append({"role": role, "content": " ".join(p for p in pieces if p)})
    if conversation[-1]["role"] == "assistant":
        raise RequestRefused("the last message is the assistant's; end with a user message for the model to answer", param="messages")
    return ParsedChat(conversation, files)


def _read_part(part: dict[str, Any], kind: str, at: str, policy: MediaPolicy) -> tuple[str, bytes]:
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        fmt = str(audio.get("format", "wav")).lower()
        if fmt not in AUDIO_FORMATS:
            raise RequestRefused(f"{at}.input_audio.format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}", param=f"{at}.input_audio.format")
        return f"item{AUDIO_FORMATS[fmt]}", _b64(audio.get("data"), f"{at}.input_audio.data", policy)
    holder = part.get(kind)
    url = holder.get("url") if isinstance(holder, dict) else holder
    if not isinstance(url, str) or not url:
        raise RequestRefused(f"{at}.{kind}.url is missing", param=f"{at}.{kind}.url")
    name, data = _read_url(url, f"{at}.{kind}.url", policy)
    if kind == "image_url":
        check_pixels(name, data, policy.max_pixels, at)
    return name, data


def _b64(text: Any, at: str, policy: MediaPolicy) -> bytes:
    if not isinstance(text, str):
        raise RequestRefused(f"{at} must be base64 text", param=at)
    if len(text) * 3 // 4 > policy.max_bytes:
        raise RequestRefused(f"{at}: the item is over {policy.max_bytes} bytes (limit --max-body-bytes)", status=413, param=at,
                             code="media_too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRefused(f"{at} is not valid base64", param=at) from None


def _read_url(url: str, at: str, policy: MediaPolicy) -> tuple[str, bytes]:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        media_type = header.split(";")[0].strip().lower()
        if not sep or ";base64" not in header.lower():
            raise RequestRefused(f"{at}: a data: URL must be data:<type>;base64,<data>", param=at)
        if media_type not in MEDIA_TYPES:
            raise RequestRefused(f"{at}: media type {media_type!r} is not one of {', '.join(sorted(MEDIA_TYPES))}", param=at)
        return f"item{MEDIA_TYPES[media_type]}", _b64(payload, at, policy)
    if scheme not in ("http", "https", "file"):
        raise RequestRefused(f"{at}: URL scheme {scheme!r} is not supported; send the media inline as a data: URL", param=at)
    if not _allowed(url, policy.allow_from):
        raise RequestRefused(f"{at}: {scheme} URLs are refused (only data: URLs are accepted by default); start the server with "
                             f"--allow-media-from PREFIX to admit URLs under PREFIX", status=400, param=at, code="url_not_allowed")
    name = posixpath.basename(urllib.parse.urlparse(url).path) or "item"
    if scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        if not path.is_file():
            raise RequestRefused(f"{at}: {path} is not a file", param=at)
        if path.stat().st_size > policy.max_bytes:
            raise RequestRefused(f"{at}: {path} is over {policy.max_bytes} bytes (limit --max-body-bytes)", status=413, param=at,
                                 code="media_too_large")
        return name, path.read_bytes()
    return name, _fetch(url, at, policy)


def _allowed(url: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``url`` lies under one of ``prefixes``: same scheme and host, its normalised path inside the prefix's
    (``..`` cannot climb out; for file:// symlinks are resolved first)."""
    parsed = urllib.parse.urlparse(url)
    for prefix in prefixes:
        allowed = urllib.parse.urlparse(prefix)
        if (parsed.scheme.lower(), parsed.netloc.lower()) != (allowed.scheme.lower(), allowed.netloc.lower()):
            continue
        if parsed.scheme.lower() == "file":
            path = Path(urllib.parse.unquote(parsed.path)).resolve()
            root = Path(urllib.parse.unquote(allowed.path)).resolve()
            if path == root or root in path.parents:
                return True
            continue
        path = posixpath.normpath(urllib.parse.unquote(parsed.path) or "/")
        root = allowed.path or "/"
        if ".." not in urllib.parse.unquote(parsed.path).split("/") and (path + "/").startswith(root.rstrip("/") + "/"):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead outside the allow-list: refused, not followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str, at: str, policy: MediaPolicy) -> bytes:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=policy.fetch_timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is the client's problem to fix, said in one line
        raise RequestRefused(f"{at}: fetching {url} failed ({type(exc).__name__}: {exc})", param=at, code="media_fetch_failed") from None
    if len(data) > policy.max_bytes:
        raise RequestRefused(f"{at}: {url} is over {policy.max_bytes} bytes (limit --max-body-bytes)", status=413, param=at,
                             code="media_too_large")
    return data


def check_pixels(name: str, data: bytes, max_pixels: int, at: str) -> None:
    """Refuse an image over ``max_pixels`` from its header alone (formats Pillow does not open, such as DICOM, are left
    to the run's domain, which has its own limit)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
    except Image.DecompressionBombError:
        width, height, frames = max_pixels + 1, 1, 1
    except Exception:  # noqa: BLE001 - not an image Pillow knows: the domain decides
        return
    if width * height * frames > max_pixels:
        raise RequestRefused(f"{at}: {name} is {width} x {height} x {frames} frames = {width * height * frames} pixels, over the "
                             f"limit of {max_pixels} (--max-pixels); send a smaller image", param=at, code="image_too_large")
