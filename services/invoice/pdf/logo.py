"""Logo upload validation and normalization.

PNG and JPEG are decoded with Pillow, checked, orientation-fixed, downscaled and re-encoded as PNG
(metadata stripped). SVG is parsed strictly, sanitized (no DTD/entities, scripts, event handlers or
external references) and kept as vector; svglib must be able to convert it.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections import OrderedDict
from typing import Any

from services.invoice.pdf.models import NormalizedLogo

MAX_LOGO_BYTES = 1024 * 1024  # 1 MB
MAX_SOURCE_SIDE = 5000  # px, refused above (also guards against decompression bombs)
MIN_SOURCE_SIDE = 16  # px
NORMALIZED_MAX_SIZE = (1200, 600)  # px, larger images are downscaled to fit
MAX_SVG_SIDE = 10000.0  # user units
MAX_SVG_ELEMENTS = 20000

_CONTENT_TYPES = {
    "image/png": "png",
    "image/x-png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/svg+xml": "svg",
    "image/svg": "svg",
}
_KIND_LABEL = {"png": "a PNG image", "jpeg": "a JPEG image", "svg": "an SVG image"}
_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_NS = "http://www.w3.org/1999/xlink"
_FORBIDDEN_SVG_TAGS = {"script", "foreignObject", "iframe", "embed", "object", "audio", "video", "handler"}
_SAFE_DATA_URI = re.compile(r"^data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)


class LogoError(ValueError):
    """The uploaded logo cannot be used; the message says why, for the admin."""


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<?xml", b"<svg", b"<!--", b"<!doctype svg")) and b"<svg" in data[:8192].lower():
        return "svg"
    return None


def validate_logo(data: bytes, content_type: str) -> NormalizedLogo:
    """Check an uploaded logo and return it normalized, or raise `LogoError` with a clear message."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LogoError("logo must be uploaded as a file")
    data = bytes(data)
    if not data:
        raise LogoError("logo file is empty")
    if len(data) > MAX_LOGO_BYTES:
        raise LogoError(f"logo is too large ({len(data) / 1024 / 1024:.1f} MB); the limit is 1 MB")
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    kind = _CONTENT_TYPES.get(declared)
    if kind is None:
        shown = declared or "(none)"
        raise LogoError(f"unsupported logo type {shown}; upload a PNG, JPEG or SVG image")
    actual = _sniff(data)
    if actual is None:
        raise LogoError(f"logo is not a valid image: the file is not {_KIND_LABEL[kind]}")
    if actual != kind:
        raise LogoError(f"logo content type {declared} does not match the file, which is {_KIND_LABEL[actual]}")
    if kind == "svg":
        return _normalize_svg(data, declared)
    return _normalize_raster(data, kind, declared)


def _normalize_raster(data: bytes, kind: str, declared: str) -> NormalizedLogo:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = (probe.format or "").lower()
            width, height = probe.size
            if fmt != kind:
                raise LogoError(f"logo is not a valid {kind.upper()} image")
            if width > MAX_SOURCE_SIDE or height > MAX_SOURCE_SIDE:
                raise LogoError(f"logo is {width}x{height} pixels; the maximum is {MAX_SOURCE_SIDE}x{MAX_SOURCE_SIDE}")
            if width < MIN_SOURCE_SIDE or height < MIN_SOURCE_SIDE:
                raise LogoError(
                    f"logo is {width}x{height} pixels; it must be at least {MIN_SOURCE_SIDE}x{MIN_SOURCE_SIDE}"
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            img = img.convert("RGBA" if has_alpha else "RGB")
            img.thumbnail(NORMALIZED_MAX_SIZE, Image.Resampling.LANCZOS)
            out = io.BytesIO()
            img.save(out, format="PNG", optimize=True)
            width, height = img.size
    except LogoError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise LogoError(f"logo is not a valid {kind.upper()} image (it cannot be decoded: {exc})") from exc
    return NormalizedLogo(data=out.getvalue(), mime="image/png", width=width, height=height, source_mime=declared)


_CSS_URL = re.compile(r"url\(\s*['\"]?\s*([^)'\"\s]*)", re.IGNORECASE)


def _external_css(css: str) -> bool:
    """CSS that imports or points at anything but a fragment of the SVG itself."""
    if "@import" in css.lower():
        return True
    return any(not ref.startswith("#") for ref in _CSS_URL.findall(css))


def _local(tag: Any) -> str:
    if not isinstance(tag, str):
        return ""
    return tag.rsplit("}", 1)[-1]


def _normalize_svg(data: bytes, declared: str) -> NormalizedLogo:
    from lxml import etree

    if b"<!doctype" in data[:4096].lower() or b"<!entity" in data.lower():
        raise LogoError("logo SVG must not contain a DOCTYPE or entity declarations")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, recover=False, huge_tree=False, remove_comments=True, remove_pis=True
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise LogoError(f"logo SVG is broken: {exc}") from exc
    if (
        root is None
        or _local(root.tag) != "svg"
        or (root.tag.startswith("{") and not root.tag.startswith(f"{{{_SVG_NS}}}"))
    ):
        raise LogoError("logo SVG is broken: the root element is not <svg>")
    count = 0
    for el in list(root.iter()):
        count += 1
        if count > MAX_SVG_ELEMENTS:
            raise LogoError(f"logo SVG is too complex (more than {MAX_SVG_ELEMENTS} elements)")
        if not isinstance(el.tag, str):
            continue
        if _local(el.tag) == "style" and _external_css(el.text or ""):
            raise LogoError("logo SVG must not reference external files or URLs")
        if _local(el.tag) in _FORBIDDEN_SVG_TAGS:
            parent = el.getparent()
            if parent is not None:
                parent.remove(el)
            continue
        for attr in list(el.attrib):
            name = _local(attr)
            value = el.attrib[attr].strip()
            if name.lower().startswith("on"):
                del el.attrib[attr]
            elif (
                name == "href"
                and not (value.startswith("#") or _SAFE_DATA_URI.match(value))
                or name == "style"
                and "url(" in value
                and "url(#" not in value.replace(" ", "")
            ):
                raise LogoError("logo SVG must not reference external files or URLs")
    clean = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    drawing = svg_drawing(clean)
    if drawing is None:
        raise LogoError("logo SVG is broken: it cannot be converted")
    width, height = float(drawing.width or 0), float(drawing.height or 0)
    if not (0 < width <= MAX_SVG_SIDE and 0 < height <= MAX_SVG_SIDE):
        raise LogoError("logo SVG has no usable size: give the <svg> a width and height or a viewBox")
    if not _has_shapes(drawing):
        raise LogoError("logo SVG is empty: it draws nothing")
    return NormalizedLogo(
        data=clean,
        mime="image/svg+xml",
        width=max(1, round(width)),
        height=max(1, round(height)),
        source_mime=declared,
    )


def _has_shapes(node: Any, depth: int = 0) -> bool:
    from reportlab.graphics.shapes import Group

    for child in getattr(node, "contents", []) or []:
        if not isinstance(child, Group) or (depth < 50 and _has_shapes(child, depth + 1)):
            return True
    return False


_svg_cache: OrderedDict[str, Any] = OrderedDict()
_svg_lock = threading.Lock()


def svg_drawing(data: bytes) -> Any:
    """svglib Drawing for (already sanitized) SVG bytes; None if it cannot be converted. Cached."""
    key = hashlib.sha256(data).hexdigest()
    with _svg_lock:
        if key in _svg_cache:
            _svg_cache.move_to_end(key)
            return _svg_cache[key]
    import logging

    from svglib.svglib import svg2rlg

    svglib_log = logging.getLogger("svglib.svglib")
    previous = svglib_log.level
    svglib_log.setLevel(logging.CRITICAL)
    try:
        drawing = svg2rlg(io.BytesIO(data), resolve_entities=False)
    except Exception:
        drawing = None
    finally:
        svglib_log.setLevel(previous)
    with _svg_lock:
        _svg_cache[key] = drawing
        while len(_svg_cache) > 32:
            _svg_cache.popitem(last=False)
    return drawing
