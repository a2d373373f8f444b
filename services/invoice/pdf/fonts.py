"""Fonts for the invoice PDF: discovery, registration with reportlab, and per-script fallback.

ReportLab embeds TrueType (glyf) fonts only and has no automatic glyph fallback, so text is split
into runs, each set in the first font of a chain that has the glyphs:

    Noto Sans -> Noto Sans Hebrew -> Noto Sans Arabic -> Droid Sans Fallback (CJK) -> DejaVu Sans

Right-to-left text is reordered to visual order with python-bidi, and Arabic is shaped into its
presentation forms with arabic-reshaper (reportlab's own bidi needs `rlbidi`, which is not on PyPI,
and its harfbuzz shaping writes private-use code points that break text extraction).

Debian packages: fonts-noto-core, fonts-droid-fallback, fonts-dejavu-core (Liberation Sans from
fonts-liberation2 is accepted as a primary substitute). Extra directories can be given in the
INVOICE_PDF_FONT_DIRS environment variable (os.pathsep separated); they are searched first.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from reportlab.lib.fonts import addMapping
from reportlab.lib.styles import ParagraphStyle
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Paragraph

log = logging.getLogger(__name__)

FONT_ROOTS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.local/share/fonts"))

# (slot name, regular candidates, bold candidates); the first file found wins.
_SLOTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "Sans",
        ("NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "DejaVuSans.ttf"),
        ("NotoSans-Bold.ttf", "LiberationSans-Bold.ttf", "DejaVuSans-Bold.ttf"),
    ),
    ("Hebrew", ("NotoSansHebrew-Regular.ttf",), ("NotoSansHebrew-Bold.ttf",)),
    ("Arabic", ("NotoSansArabic-Regular.ttf", "NotoNaskhArabic-Regular.ttf"), ("NotoSansArabic-Bold.ttf",)),
    ("CJK", ("DroidSansFallbackFull.ttf", "DroidSansFallback.ttf"), ()),
    ("Symbols", ("DejaVuSans.ttf",), ("DejaVuSans-Bold.ttf",)),
)

REQUIRED_FONT_PACKAGES = ("fonts-noto-core", "fonts-droid-fallback", "fonts-dejavu-core")

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_INVISIBLE_RE = re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")
_RTL_RE = re.compile(r"[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")
_ARABIC_RE = re.compile(r"[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff]")


@dataclass(frozen=True)
class _Face:
    name: str  # registered reportlab font name
    path: str
    cmap: frozenset[int] = field(repr=False)


@dataclass(frozen=True)
class FontSet:
    """The registered chain. `regular[0]`/`bold[0]` are the primary fonts."""

    regular: tuple[_Face, ...]
    bold: tuple[_Face, ...]
    missing: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.regular[0].name if self.regular else "Helvetica"

    @property
    def base_bold(self) -> str:
        return self.bold[0].name if self.bold else "Helvetica-Bold"

    @property
    def degraded(self) -> bool:
        return not self.regular

    def identity(self) -> list[str]:
        """What affects rendering (for the cache fingerprint)."""
        return [os.path.basename(f.path) for f in self.regular + self.bold]


_lock = threading.Lock()
_fontset: FontSet | None = None


def _index_font_files() -> dict[str, str]:
    roots: list[str] = []
    extra = os.environ.get("INVOICE_PDF_FONT_DIRS", "")
    roots.extend(p for p in extra.split(os.pathsep) if p)
    roots.extend(FONT_ROOTS)
    found: dict[str, str] = {}
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.lower().endswith(".ttf"):
                    found.setdefault(name, os.path.join(dirpath, name))
    return found


def _register(name: str, path: str) -> _Face | None:
    try:
        font = TTFont(name, path)
        pdfmetrics.registerFont(font)
    except Exception as exc:  # a broken or CFF-only file: skip it, try the next candidate
        log.warning("invoice pdf: cannot use font %s: %s", path, exc)
        return None
    return _Face(name=name, path=path, cmap=frozenset(font.face.charToGlyph))


def get_fontset() -> FontSet:
    """Find and register the fonts once per process (thread safe)."""
    global _fontset
    if _fontset is not None:
        return _fontset
    with _lock:
        if _fontset is not None:
            return _fontset
        files = _index_font_files()
        regular: list[_Face] = []
        bold: list[_Face] = []
        missing: list[str] = []
        used_paths: dict[str, _Face] = {}
        for slot, reg_candidates, bold_candidates in _SLOTS:
            reg_face = _first_face(f"Invoice{slot}", reg_candidates, files, used_paths)
            if reg_face is None:
                missing.append(slot)
                continue
            regular.append(reg_face)
            bold_face = _first_face(f"Invoice{slot}-Bold", bold_candidates, files, used_paths) or reg_face
            bold.append(bold_face)
            addMapping(reg_face.name, 0, 0, reg_face.name)
            addMapping(reg_face.name, 1, 0, bold_face.name)
            addMapping(reg_face.name, 0, 1, reg_face.name)
            addMapping(reg_face.name, 1, 1, bold_face.name)
            if bold_face is not reg_face:
                addMapping(bold_face.name, 0, 0, bold_face.name)
                addMapping(bold_face.name, 1, 0, bold_face.name)
                addMapping(bold_face.name, 0, 1, bold_face.name)
                addMapping(bold_face.name, 1, 1, bold_face.name)
        if missing:
            log.warning(
                "invoice pdf: fonts missing for %s; install Debian packages %s",
                ", ".join(missing),
                " ".join(REQUIRED_FONT_PACKAGES),
            )
        _fontset = FontSet(regular=tuple(regular), bold=tuple(bold), missing=tuple(missing))
        return _fontset


def _first_face(name: str, candidates: tuple[str, ...], files: dict[str, str], used: dict[str, _Face]) -> _Face | None:
    for candidate in candidates:
        path = files.get(candidate)
        if not path:
            continue
        key = f"{name}|{path}"
        if key in used:
            return used[key]
        face = _register(name, path)
        if face is not None:
            used[key] = face
            return face
    return None


def clean_text(value: object) -> str:
    """Text safe to lay out: str, no control characters or lone surrogates, \\n line breaks."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    return _CONTROL_RE.sub("", text)


def visual_line(line: str) -> str:
    """Logical -> visual order for one line of text containing right-to-left script."""
    if not _RTL_RE.search(line):
        return line
    return _visual(_reshape(line))


def has_rtl(text: str) -> bool:
    return bool(_RTL_RE.search(text))


def _runs(text: str, faces: tuple[_Face, ...]) -> list[tuple[str, str]]:
    """Split text into (font name, text) runs, preferring to stay in the current font."""
    if not faces:
        return [("", text)] if text else []
    runs: list[tuple[str, str]] = []
    current: _Face | None = None
    buf: list[str] = []
    primary = faces[0]
    for ch in text:
        cp = ord(ch)
        if current is not None and cp in current.cmap:
            buf.append(ch)
            continue
        chosen = primary
        for face in faces:
            if cp in face.cmap:
                chosen = face
                break
        if chosen is current:
            buf.append(ch)
            continue
        if buf and current is not None:
            runs.append((current.name, "".join(buf)))
        current = chosen
        buf = [ch]
    if buf and current is not None:
        runs.append((current.name, "".join(buf)))
    return runs


def markup(value: object, *, bold: bool = False, max_chars: int | None = None) -> str:
    """Paragraph markup for arbitrary user text: escaped, bidi-ordered, fonts per script.

    Newlines become <br/>. The paragraph style's own font is used for runs in the primary font.
    """
    text = clean_text(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "\u2026"
    fs = get_fontset()
    faces = fs.bold if bold else fs.regular
    result = _markup_visual_lines([visual_line(line) for line in text.split("\n")], faces, fs)
    return f"<b>{result}</b>" if bold and result else result


def covered_by_primary(text: str, *, bold: bool = False) -> bool:
    """True if the primary font has every character (the text can be drawn as a plain string)."""
    fs = get_fontset()
    faces = fs.bold if bold else fs.regular
    if not faces:
        return all(ord(ch) < 256 for ch in text)
    cmap = faces[0].cmap
    return all(ord(ch) in cmap for ch in text)


def _reshape(line: str) -> str:
    if _ARABIC_RE.search(line):
        try:
            import arabic_reshaper

            return arabic_reshaper.reshape(line)
        except Exception as exc:
            log.warning("invoice pdf: arabic reshaping failed: %s", exc)
    return line


def _visual(line: str) -> str:
    try:
        from bidi import get_display

        return get_display(line)
    except Exception as exc:
        log.warning("invoice pdf: bidi reordering failed: %s", exc)
        return line


def _text_width(text: str, faces: tuple[_Face, ...], size: float) -> float:
    if not faces:
        return pdfmetrics.stringWidth(text, "Helvetica", size)
    return sum(pdfmetrics.stringWidth(run, name, size) for name, run in _runs(text, faces))


def text_width(text: str, size: float, *, bold: bool = False) -> float:
    """Width in points of text set with the fallback chain."""
    fs = get_fontset()
    return _text_width(text, fs.bold if bold else fs.regular, size)


def _markup_visual_lines(lines: list[str], faces: tuple[_Face, ...], fs: FontSet) -> str:
    out: list[str] = []
    for line in lines:
        line = _INVISIBLE_RE.sub("", line)
        parts: list[str] = []
        for font_name, run in _runs(line, faces):
            esc = escape(run)
            if not font_name or font_name in (fs.base, fs.base_bold):
                parts.append(esc)
            else:
                parts.append(f'<font face="{font_name}">{esc}</font>')
        out.append("".join(parts))
    return "<br/>".join(out)


class BidiParagraph(Paragraph):
    """Paragraph for text with right-to-left script.

    Lines are broken in logical order first, then each line is reordered to visual order, so a
    wrapped right-to-left name reads correctly line by line (reportlab's own bidi needs rlbidi).
    """

    def __init__(self, text: str | None, style: ParagraphStyle, *, bold: bool = False, **kwargs: object) -> None:
        self._bold = bold
        self._wrapped_for: float | None = None
        if text is None or kwargs.get("frags") is not None:
            # a part made by Paragraph.split(): its lines are already broken and in visual order
            self._logical: str | None = None
            super().__init__(text, style, **kwargs)  # type: ignore[arg-type]
            return
        self._logical = text
        super().__init__(self._build_markup(None), style)

    def _build_markup(self, width: float | None) -> str:
        fs = get_fontset()
        faces = fs.bold if self._bold else fs.regular
        size = getattr(getattr(self, "style", None), "fontSize", 10)
        lines: list[str] = []
        for hard_line in (self._logical or "").split("\n"):
            shaped = _reshape(hard_line)
            if width is None or _text_width(shaped, faces, size) <= width:
                lines.append(shaped)
                continue
            current, current_w = "", 0.0  # glyph widths add up: no kerning in reportlab
            for token in re.split(r"( +)", shaped):
                if not token:
                    continue
                token_w = _text_width(token, faces, size)
                if current and not token.isspace() and current_w + token_w > width:
                    lines.append(current.rstrip())
                    current, current_w = token, token_w
                else:
                    current, current_w = current + token, current_w + token_w
            lines.append(current.rstrip())
        result = _markup_visual_lines([_visual(line) for line in lines], faces, fs)
        return f"<b>{result}</b>" if self._bold and result else result

    def wrap(self, availWidth: float, availHeight: float) -> tuple[float, float]:  # noqa: N803
        if self._logical is not None and self._wrapped_for != availWidth:
            self._wrapped_for = availWidth
            style = self.style
            usable = availWidth - self.style.leftIndent - self.style.rightIndent - 0.5
            Paragraph.__init__(self, self._build_markup(usable), style)
        return super().wrap(availWidth, availHeight)


def cap_text(text: str, max_chars: int | None, max_lines: int | None = None) -> str:
    """Shorten text to at most max_chars characters and max_lines lines, ending with an ellipsis."""
    cut = False
    if max_lines is not None and text.count("\n") >= max_lines:
        text = "\n".join(text.split("\n", max_lines)[:max_lines])
        cut = True
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1]
        cut = True
    return text.rstrip() + "\u2026" if cut else text


def text_paragraph(
    value: object,
    style: ParagraphStyle,
    *,
    bold: bool = False,
    max_chars: int | None = None,
    max_lines: int | None = None,
) -> Paragraph:
    """A Paragraph of arbitrary user text: escaped, fonts per script, right-to-left aware."""
    text = cap_text(clean_text(value), max_chars, max_lines)
    if has_rtl(text):
        return BidiParagraph(text, style, bold=bold)
    return Paragraph(markup(text, bold=bold), style)
