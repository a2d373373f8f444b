"""Invoice PDF rendering with reportlab platypus.

Layout: a brand-colour header band (logo, company, INVOICE + number), parties (from / bill to /
invoice facts), an amount-due strip with the status stamp, the line items table (header repeated on
every page, rows split across pages when a description is longer than a page), totals, notes and
terms, and the payment block (instructions, bank details, pay link and its QR code). Every page has
a footer with the template's footer text and "Page n of m". Drafts get a DRAFT watermark.

Output is deterministic: the same inputs give the same bytes (reportlab's invariant mode).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4, LETTER
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    BaseDocTemplate,
    Flowable,
    Frame,
    KeepTogether,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)

from services.invoice.pdf.fonts import (
    FontSet,
    clean_text,
    covered_by_primary,
    get_fontset,
    markup,
    text_paragraph,
    text_width,
)
from services.invoice.pdf.logo import svg_drawing
from services.invoice.pdf.models import InvoiceDocument, InvoiceStatus, TemplateSettings
from services.invoice.pdf.money import format_date, format_money, format_quantity, format_rate, get_locale

log = logging.getLogger(__name__)

# Bump when the layout changes: it is part of the cache fingerprint.
RENDERER_VERSION = "invoice-pdf/1.0.0"

LETTER_TERRITORIES = frozenset({"US", "CA", "MX", "PH", "CL", "CO", "VE", "GT", "PR"})

# Caps on user text, so absurd input stays bounded in time; longer text ends with an ellipsis.
MAX_DESCRIPTION_CHARS = 20_000
MAX_NAME_CHARS = 300
MAX_ADDRESS_CHARS = 1_000
MAX_SHORT_CHARS = 254
MAX_LONG_TEXT_CHARS = 20_000
MAX_URL_CHARS = 2_000
MAX_DESCRIPTION_LINES = 150
MAX_ADDRESS_LINES = 30
MAX_LONG_TEXT_LINES = 300
# notes + terms up to this length sit beside the totals box; longer ones flow below it
SIDE_NOTES_CHARS = 700
TOTALS_WIDTH = 88 * mm

INK = colors.HexColor("#1F2933")
MUTED = colors.HexColor("#616E7C")
RULE = colors.HexColor("#D9DEE4")
ZEBRA = colors.HexColor("#F5F7FA")
WHITE = colors.white

_STAMPS: dict[InvoiceStatus, tuple[str, str]] = {
    InvoiceStatus.PAID: ("PAID", "#1E8E3E"),
    InvoiceStatus.OVERDUE: ("OVERDUE", "#C62828"),
    InvoiceStatus.CANCELLED: ("CANCELLED", "#6B7280"),
    InvoiceStatus.PARTIAL: ("PARTIALLY PAID", "#B26A00"),
}


# --------------------------------------------------------------------------- helpers


def _mix(color: colors.Color, other: colors.Color, t: float) -> colors.Color:
    return colors.Color(
        color.red + (other.red - color.red) * t,
        color.green + (other.green - color.green) * t,
        color.blue + (other.blue - color.blue) * t,
    )


def _luminance(color: colors.Color) -> float:
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(color.red) + 0.7152 * channel(color.green) + 0.0722 * channel(color.blue)


def _on_color(background: colors.Color) -> colors.Color:
    """White or dark text, whichever reads better on `background`."""
    return INK if _luminance(background) > 0.45 else WHITE


def _safe_url(url: str | None) -> str | None:
    if not url:
        return None
    url = clean_text(url).strip()
    if not url or len(url) > MAX_URL_CHARS or any(c.isspace() for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return url


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass
class _Ctx:
    doc: InvoiceDocument
    tpl: TemplateSettings
    fonts: FontSet
    locale: str
    brand: colors.Color
    accent: colors.Color
    on_brand: colors.Color
    tint: colors.Color
    page_size: tuple[float, float]
    margin: float
    display_number: str
    status: InvoiceStatus
    safe: bool
    styles: dict[str, ParagraphStyle]

    def money(self, amount: int) -> str:
        return format_money(amount, self.doc.currency, self.locale)

    def cap(self, limit: int) -> int:
        return min(limit, 500) if self.safe else limit


def _text_brand(brand: colors.Color) -> colors.Color:
    """The brand colour for text on white: darkened until it has enough contrast (light brands)."""
    color = brand
    for _ in range(12):
        if _luminance(color) <= 0.18:  # contrast with white >= ~4.5:1
            break
        color = _mix(color, colors.black, 0.15)
    return color


def _styles(fonts: FontSet, brand: colors.Color, on_brand: colors.Color) -> dict[str, ParagraphStyle]:
    base, bold = fonts.base, fonts.base_bold
    brand = _text_brand(brand)
    common: dict[str, Any] = {"fontName": base, "textColor": INK, "splitLongWords": 1, "wordWrap": None}
    s = {
        "body": ParagraphStyle("body", fontSize=9, leading=12, **common),
        "small": ParagraphStyle("small", fontSize=8, leading=10.5, **{**common, "textColor": MUTED}),
        "label": ParagraphStyle("label", fontSize=7.5, leading=10, **{**common, "textColor": MUTED}),
        "block_title": ParagraphStyle(
            "block_title", fontSize=7.5, leading=10, spaceAfter=2, **{**common, "fontName": bold, "textColor": brand}
        ),
        "name": ParagraphStyle("name", fontSize=10, leading=13, **{**common, "fontName": bold}),
        "cell": ParagraphStyle("cell", fontSize=8.5, leading=10.5, **common),
        "cell_r": ParagraphStyle("cell_r", fontSize=8.5, leading=10.5, alignment=TA_RIGHT, **common),
        "head": ParagraphStyle("head", fontSize=8, leading=10, **{**common, "fontName": bold, "textColor": on_brand}),
        "head_r": ParagraphStyle(
            "head_r", fontSize=8, leading=10, alignment=TA_RIGHT, **{**common, "fontName": bold, "textColor": on_brand}
        ),
        "meta_r": ParagraphStyle("meta_r", fontSize=8.5, leading=11.5, alignment=TA_RIGHT, **common),
        "meta_rb": ParagraphStyle(
            "meta_rb", fontSize=8.5, leading=11.5, alignment=TA_RIGHT, **{**common, "fontName": bold}
        ),
        "due_label": ParagraphStyle("due_label", fontSize=8, leading=10, **{**common, "textColor": MUTED}),
        "due_amount": ParagraphStyle(
            "due_amount", fontSize=18, leading=22, **{**common, "fontName": bold, "textColor": brand}
        ),
        "due_value": ParagraphStyle("due_value", fontSize=10.5, leading=14, **{**common, "fontName": bold}),
        "tot_label": ParagraphStyle("tot_label", fontSize=9, leading=12, **common),
        "tot_value": ParagraphStyle("tot_value", fontSize=9, leading=12, alignment=TA_RIGHT, **common),
        "tot_label_b": ParagraphStyle("tot_label_b", fontSize=10, leading=13, **{**common, "fontName": bold}),
        "tot_value_b": ParagraphStyle(
            "tot_value_b", fontSize=10, leading=13, alignment=TA_RIGHT, **{**common, "fontName": bold}
        ),
        "due_row_l": ParagraphStyle(
            "due_row_l", fontSize=10.5, leading=14, **{**common, "fontName": bold, "textColor": on_brand}
        ),
        "due_row_r": ParagraphStyle(
            "due_row_r",
            fontSize=10.5,
            leading=14,
            alignment=TA_RIGHT,
            **{**common, "fontName": bold, "textColor": on_brand},
        ),
        "section": ParagraphStyle(
            "section",
            fontSize=9,
            leading=12,
            spaceBefore=4,
            spaceAfter=3,
            **{**common, "fontName": bold, "textColor": brand},
        ),
        "band_company": ParagraphStyle(
            "band_company", fontSize=15, leading=18, **{**common, "fontName": bold, "textColor": on_brand}
        ),
        "band_title": ParagraphStyle(
            "band_title",
            fontSize=24,
            leading=28,
            alignment=TA_RIGHT,
            **{**common, "fontName": bold, "textColor": on_brand},
        ),
        "band_number": ParagraphStyle(
            "band_number", fontSize=10.5, leading=13, alignment=TA_RIGHT, **{**common, "textColor": on_brand}
        ),
        "band_small": ParagraphStyle("band_small", fontSize=9, leading=11, **{**common, "textColor": on_brand}),
        "band_small_r": ParagraphStyle(
            "band_small_r", fontSize=9, leading=11, alignment=TA_RIGHT, **{**common, "textColor": on_brand}
        ),
        "footer": ParagraphStyle("footer", fontSize=7.5, leading=9.5, **{**common, "textColor": MUTED}),
        "qr_caption": ParagraphStyle(
            "qr_caption", fontSize=7.5, leading=9.5, alignment=1, **{**common, "textColor": MUTED}
        ),
    }
    return s


def _p(
    ctx: _Ctx, text: object, style: str, *, bold: bool = False, limit: int | None = None, lines: int | None = None
) -> Paragraph:
    """A Paragraph of user text (escaped, font fallback, bidi), capped to `limit` chars and `lines` lines."""
    cap = ctx.cap(limit) if limit else None
    max_lines = min(lines, 20) if (lines and ctx.safe) else lines
    return text_paragraph(text, ctx.styles[style], bold=bold, max_chars=cap, max_lines=max_lines)


def _fit_paragraph(
    text: object, style: ParagraphStyle, width: float, height: float, *, bold: bool = False
) -> Paragraph:
    """A paragraph fitted into width x height: shrinks the font, then truncates with an ellipsis."""
    text = clean_text(text)
    size = style.fontSize
    min_size = max(6.0, style.fontSize * 0.6)
    while True:
        st = ParagraphStyle(f"{style.name}_fit", parent=style, fontSize=size, leading=size * 1.2)
        para = text_paragraph(text, st, bold=bold, max_chars=4000)
        _, h = para.wrap(width, height)
        if h <= height:
            return para
        if size <= min_size:
            break
        size = max(min_size, size - 1)
    lo, hi = 1, min(len(text), 4000)
    best = text_paragraph(text, st, bold=bold, max_chars=1)
    while lo <= hi:
        mid = (lo + hi) // 2
        para = text_paragraph(text, st, bold=bold, max_chars=mid)
        _, h = para.wrap(width, height)
        if h <= height:
            best, lo = para, mid + 1
        else:
            hi = mid - 1
    best.wrap(width, height)
    return best


# --------------------------------------------------------------------------- flowables


class _QRCode(Flowable):
    """Vector QR code of `data` (dark modules as filled rectangles on a white quiet zone)."""

    def __init__(self, data: str, size: float, min_module: float = 0.5 * mm) -> None:
        super().__init__()
        import qrcode
        from qrcode.constants import ERROR_CORRECT_L, ERROR_CORRECT_M

        qr = qrcode.QRCode(border=4, error_correction=ERROR_CORRECT_M if len(data) < 200 else ERROR_CORRECT_L)
        qr.add_data(data)
        qr.make(fit=True)
        self.matrix = qr.get_matrix()
        n = len(self.matrix)
        self.size = max(size, min(n * min_module, 60 * mm))
        self.width = self.height = self.size

    def wrap(self, availWidth: float, availHeight: float) -> tuple[float, float]:  # noqa: N803
        return self.size, self.size

    def draw(self) -> None:
        c = self.canv
        n = len(self.matrix)
        module = self.size / n
        c.saveState()
        c.setFillColor(WHITE)
        c.rect(0, 0, self.size, self.size, stroke=0, fill=1)
        c.setFillColor(colors.black)
        path = c.beginPath()
        for r, row in enumerate(self.matrix):
            y = self.size - (r + 1) * module
            col = 0
            while col < n:
                if row[col]:
                    start = col
                    while col < n and row[col]:
                        col += 1
                    path.rect(start * module, y, (col - start) * module, module)
                else:
                    col += 1
        c.drawPath(path, stroke=0, fill=1)
        c.restoreState()


class _Stamp(Flowable):
    """A rotated rubber-stamp box: PAID / OVERDUE / CANCELLED / PARTIALLY PAID."""

    def __init__(self, ctx: _Ctx, word: str, color_hex: str, sub: str) -> None:
        super().__init__()
        self.ctx, self.word, self.color, self.sub = ctx, word, colors.HexColor(color_hex), sub
        self.width, self.height = 58 * mm, 17 * mm

    def wrap(self, availWidth: float, availHeight: float) -> tuple[float, float]:  # noqa: N803
        self.width = min(self.width, availWidth)
        return self.width, self.height

    def draw(self) -> None:
        c = self.canv
        fonts = self.ctx.fonts
        size = 17.0
        while size > 9 and stringWidth(self.word, fonts.base_bold, size) > self.width - 16 * mm:
            size -= 1
        box_w = stringWidth(self.word, fonts.base_bold, size) + 10 * mm
        box_h = 14 * mm if self.sub else 10 * mm
        c.saveState()
        c.translate(self.width - box_w / 2 - 3 * mm, self.height / 2)
        c.rotate(8)
        c.setStrokeColor(self.color)
        c.setFillColor(self.color)
        c.setLineWidth(2)
        c.setStrokeAlpha(0.9)
        c.setFillAlpha(0.9)
        c.roundRect(-box_w / 2, -box_h / 2, box_w, box_h, 2 * mm, stroke=1, fill=0)
        text_y = 0.5 * mm if self.sub else -size * 0.35
        c.setFont(fonts.base_bold, size)
        c.drawCentredString(0, text_y, self.word)
        if self.sub:
            sub_size = 7.0
            sub = self.sub
            while len(sub) > 3 and stringWidth(sub, fonts.base, sub_size) > box_w - 3 * mm:
                sub = sub[:-2] + "\u2026"
            c.setFont(fonts.base, sub_size)
            c.drawCentredString(0, -box_h / 2 + 2.2 * mm, sub)
        c.restoreState()


class _SvgLogo(Flowable):
    def __init__(self, drawing: Any, width: float, height: float) -> None:
        super().__init__()
        self.drawing, self.width, self.height = drawing, width, height

    def draw(self) -> None:
        from reportlab.graphics import renderPDF

        d = self.drawing
        sx = self.width / float(d.width)
        sy = self.height / float(d.height)
        self.canv.saveState()
        self.canv.scale(sx, sy)
        renderPDF.draw(d, self.canv, 0, 0)
        self.canv.restoreState()


class _ItemsTable(Table):
    """Splits between rows, except that a very tall row is split inside itself to use the page.

    reportlab tries a between-rows split first and would then put the rest (with its repeated
    header) on the same page before splitting the tall row: the header would show up twice.
    """

    TALL_ROW = 120.0  # pt
    MIN_USEFUL_SPACE = 48.0  # pt

    def split(self, availWidth: float, availHeight: float) -> list[Flowable]:  # noqa: N803
        result = super().split(availWidth, availHeight)
        if len(result) == 2:
            n = len(result[0]._cellvalues)
            heights = self._rowHeights
            if (
                n < len(heights)
                and heights[n] > self.TALL_ROW
                and availHeight - sum(heights[:n]) > self.MIN_USEFUL_SPACE
            ):
                alt = self._splitRows(availHeight, doInRowSplit=1)
                if alt:
                    return alt
        return result


# --------------------------------------------------------------------------- page decorations


def _logo_flowable(ctx: _Ctx, max_w: float, max_h: float) -> Flowable | None:
    logo = ctx.tpl.logo
    if logo is None or ctx.safe:
        return None
    try:
        ratio = logo.width / logo.height
        w, h = max_w, max_w / ratio
        if h > max_h:
            h, w = max_h, max_h * ratio
        if logo.mime == "image/svg+xml":
            drawing = svg_drawing(logo.data)
            if drawing is None or not drawing.width or not drawing.height:
                return None
            return _SvgLogo(drawing, w, h)
        return _RasterLogo(logo.data, w, h)
    except Exception as exc:  # a stored logo that no longer decodes must not break the invoice
        log.warning("invoice pdf: logo skipped: %s", exc)
        return None


class _RasterLogo(Flowable):
    def __init__(self, data: bytes, width: float, height: float) -> None:
        super().__init__()
        self.reader = ImageReader(io.BytesIO(data))
        self.width, self.height = width, height

    def draw(self) -> None:
        self.canv.drawImage(self.reader, 0, 0, self.width, self.height, mask="auto")


def _draw_first_page(ctx: _Ctx, c: Canvas, band_h: float) -> None:
    page_w, page_h = ctx.page_size
    m = ctx.margin
    c.saveState()
    c.setFillColor(ctx.brand)
    c.rect(0, page_h - band_h, page_w, band_h, stroke=0, fill=1)
    c.setFillColor(ctx.accent)
    c.rect(0, page_h - band_h - 1.2 * mm, page_w, 1.2 * mm, stroke=0, fill=1)

    right_w = 62 * mm
    x = m
    logo = _logo_flowable(ctx, 46 * mm, band_h - 16 * mm)
    if logo is not None:
        pad = 2.5 * mm
        card_w, card_h = logo.width + 2 * pad, logo.height + 2 * pad
        card_y = page_h - band_h / 2 - card_h / 2
        c.setFillColor(WHITE)
        c.roundRect(x, card_y, card_w, card_h, 1.5 * mm, stroke=0, fill=1)
        logo.drawOn(c, x + pad, card_y + pad)
        x += card_w + 5 * mm
    name_w = page_w - m - right_w - 6 * mm - x
    name_h = band_h - 12 * mm
    name = _fit_paragraph(ctx.tpl.company_name, ctx.styles["band_company"], name_w, name_h, bold=True)
    _, h = name.wrap(name_w, name_h)
    name.drawOn(c, x, page_h - band_h / 2 - h / 2)

    title = Paragraph("INVOICE", ctx.styles["band_title"])
    _, th = title.wrap(right_w, 30 * mm)
    number = _fit_paragraph(ctx.display_number, ctx.styles["band_number"], right_w, 14 * mm)
    _, nh = number.wrap(right_w, 14 * mm)
    total_h = th + nh + 1 * mm
    top = page_h - band_h / 2 + total_h / 2
    title.drawOn(c, page_w - m - right_w, top - th)
    number.drawOn(c, page_w - m - right_w, top - th - 1 * mm - nh)
    c.restoreState()


def _draw_later_page(ctx: _Ctx, c: Canvas, band_h: float) -> None:
    page_w, page_h = ctx.page_size
    m = ctx.margin
    c.saveState()
    c.setFillColor(ctx.brand)
    c.rect(0, page_h - band_h, page_w, band_h, stroke=0, fill=1)
    half = (page_w - 2 * m) / 2 - 3 * mm
    left = _fit_paragraph(ctx.tpl.company_name, ctx.styles["band_small"], half, band_h - 4 * mm, bold=True)
    _, lh = left.wrap(half, band_h - 4 * mm)
    left.drawOn(c, m, page_h - band_h / 2 - lh / 2)
    right = _fit_paragraph(
        f"Invoice {ctx.display_number} (continued)",
        ctx.styles["band_small_r"],
        half,
        band_h - 4 * mm,
    )
    _, rh = right.wrap(half, band_h - 4 * mm)
    right.drawOn(c, page_w - m - half, page_h - band_h / 2 - rh / 2)
    c.restoreState()


def _draw_common(ctx: _Ctx, c: Canvas) -> None:
    page_w, page_h = ctx.page_size
    m = ctx.margin
    c.saveState()
    c.setStrokeColor(RULE)
    c.setLineWidth(0.6)
    c.line(m, 17 * mm, page_w - m, 17 * mm)
    footer = clean_text(ctx.tpl.footer_text).strip()
    if footer:
        width = page_w - 2 * m - 30 * mm
        para = _fit_paragraph(footer, ctx.styles["footer"], width, 10 * mm)
        _, h = para.wrap(width, 10 * mm)
        para.drawOn(c, m, 15.5 * mm - h)
    c.restoreState()


def _draw_watermark(ctx: _Ctx, c: Canvas) -> None:
    """DRAFT across the page, over the content, translucent."""
    page_w, page_h = ctx.page_size
    c.saveState()
    c.setFillColor(colors.HexColor("#8A96A3"))
    c.setFillAlpha(0.13)
    c.setFont(ctx.fonts.base_bold, 120)
    c.translate(page_w / 2, page_h / 2 - 15 * mm)
    c.rotate(38)
    c.drawCentredString(0, -40, "DRAFT")
    c.restoreState()


def _numbered_canvas(ctx: _Ctx) -> type[Canvas]:
    """Canvas that defers pages so the footer can say "Page n of m"."""

    class NumberedCanvas(Canvas):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:  # noqa: N802 - reportlab API
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for number, state in enumerate(self._pages, start=1):
                self.__dict__.update(state)
                if ctx.status == InvoiceStatus.DRAFT:
                    _draw_watermark(ctx, self)
                self.saveState()
                self.setFont(ctx.fonts.base, 7.5)
                self.setFillColor(MUTED)
                self.drawRightString(ctx.page_size[0] - ctx.margin, 12 * mm, f"Page {number} of {total}")
                self.restoreState()
                super().showPage()
            super().save()

    return NumberedCanvas


# --------------------------------------------------------------------------- story


def _parties(ctx: _Ctx, width: float) -> Flowable:
    tpl, doc = ctx.tpl, ctx.doc
    from_block: list[Flowable] = [Paragraph("FROM", ctx.styles["block_title"])]
    from_block.append(_p(ctx, tpl.company_name, "name", bold=True, limit=MAX_NAME_CHARS, lines=5))
    for value in (tpl.company_address, tpl.company_email, tpl.company_phone, tpl.company_website):
        if clean_text(value).strip():
            from_block.append(_p(ctx, value, "small", limit=MAX_ADDRESS_CHARS, lines=MAX_ADDRESS_LINES))
    if tpl.tax_id.strip():
        from_block.append(_p(ctx, f"Tax ID: {tpl.tax_id}", "small", limit=MAX_SHORT_CHARS))

    client = doc.client
    bill: list[Flowable] = [Paragraph("BILL TO", ctx.styles["block_title"])]
    bill.append(_p(ctx, client.name or "\u2014", "name", bold=True, limit=MAX_NAME_CHARS, lines=5))
    for value in (client.address, client.email):
        if value and clean_text(value).strip():
            bill.append(_p(ctx, value, "small", limit=MAX_ADDRESS_CHARS, lines=MAX_ADDRESS_LINES))
    if client.tax_id and client.tax_id.strip():
        bill.append(_p(ctx, f"Tax ID: {client.tax_id}", "small", limit=MAX_SHORT_CHARS))

    rows: list[tuple[str, str]] = [("Invoice number", ctx.display_number)]
    rows.append(("Issue date", format_date(doc.issue_date, ctx.locale) or "\u2014"))
    rows.append(("Due date", format_date(doc.due_date, ctx.locale) or "\u2014"))
    if doc.project_reference and doc.project_reference.strip():
        rows.append(("Project", doc.project_reference))
    rows.append(("Status", ctx.status.value.title()))
    meta_w = 64 * mm
    meta = Table(
        [
            [
                Paragraph(label, ctx.styles["label"]),
                _p(ctx, value, "meta_rb" if i == 0 else "meta_r", limit=MAX_SHORT_CHARS),
            ]
            for i, (label, value) in enumerate(rows)
        ],
        colWidths=[24 * mm, meta_w - 24 * mm],
        splitInRow=1,
    )
    meta.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                ("TOPPADDING", (0, 0), (-1, -1), 1.2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
                ("LINEBELOW", (0, 0), (-1, -2), 0.4, RULE),
            ]
        )
    )
    col = (width - meta_w - 8 * mm) / 2
    table = Table([[from_block, bill, meta]], colWidths=[col, col + 8 * mm, meta_w], splitInRow=1)
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("RIGHTPADDING", (0, 0), (1, 0), 6 * mm),
                ("RIGHTPADDING", (2, 0), (2, 0), 0),
                ("TOPPADDING", (0, 0), (-1, -1), 0),
            ]
        )
    )
    return table


def _summary_strip(ctx: _Ctx, width: float) -> Flowable:
    doc = ctx.doc
    due_cell = [
        Paragraph(f"Amount due ({_attr(doc.currency)})", ctx.styles["due_label"]),
        _p(ctx, ctx.money(doc.amount_due), "due_amount"),
    ]
    if ctx.status == InvoiceStatus.PAID and doc.paid_at:
        date_label, date_value = "Paid on", format_date(_as_date(doc.paid_at), ctx.locale)
    else:
        date_label, date_value = "Due date", format_date(doc.due_date, ctx.locale) or "On receipt"
    date_cell = [Paragraph(date_label, ctx.styles["due_label"]), _p(ctx, date_value, "due_value")]
    stamp: Flowable | str = ""
    if ctx.status in _STAMPS:
        word, color_hex = _STAMPS[ctx.status]
        sub = ""
        if ctx.status == InvoiceStatus.PAID and doc.paid_at:
            sub = format_date(_as_date(doc.paid_at), ctx.locale)
        elif ctx.status == InvoiceStatus.OVERDUE and doc.due_date:
            sub = f"was due {format_date(doc.due_date, ctx.locale)}"
        elif ctx.status == InvoiceStatus.PARTIAL:
            sub = f"{ctx.money(doc.amount_paid)} received"
        stamp = _Stamp(ctx, word, color_hex, sub)
    stamp_w = 62 * mm
    first = (width - stamp_w) * 0.55
    table = Table([[due_cell, date_cell, stamp]], colWidths=[first, width - stamp_w - first, stamp_w])
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), ctx.tint),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("LEFTPADDING", (0, 0), (-1, -1), 5 * mm),
                ("RIGHTPADDING", (2, 0), (2, 0), 2 * mm),
                ("TOPPADDING", (0, 0), (-1, -1), 2.6 * mm),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2.6 * mm),
                ("LINEBEFORE", (0, 0), (0, 0), 2.2, ctx.brand),
            ]
        )
    )
    return table


def _as_date(value: Any) -> Any:
    return value.date() if hasattr(value, "date") and callable(value.date) else value


def _num_cell(ctx: _Ctx, text: str, style: str = "cell_r") -> Paragraph:
    return Paragraph(markup(text), ctx.styles[style])


def _plain_cell(ctx: _Ctx, text: str) -> str | Paragraph:
    """Numbers as plain strings (fast, never wrapped) when the primary font can draw them."""
    return text if covered_by_primary(text) else _num_cell(ctx, text)


def _items_table(ctx: _Ctx, width: float) -> Flowable:
    doc = ctx.doc
    items = doc.items
    show_discount = any(it.discount for it in items)
    show_tax = any(it.tax_rate is not None for it in items)

    columns: list[tuple[str, str]] = [("Description", "l"), ("Qty", "r"), ("Unit price", "r")]
    if show_discount:
        columns.append(("Discount", "r"))
    if show_tax:
        columns.append(("Tax", "r"))
    columns.append(("Amount", "r"))

    rows_text: list[list[str]] = []
    for it in items:
        row = [format_quantity(it.quantity, ctx.locale), ctx.money(it.unit_price)]
        if show_discount:
            row.append(ctx.money(-it.discount) if it.discount else "")
        if show_tax:
            row.append(format_rate(it.tax_rate, ctx.locale) if it.tax_rate is not None else "")
        row.append(ctx.money(it.amount))
        rows_text.append(row)

    # numeric columns as wide as their widest value (bounded), description takes the rest
    size, pad = 8.5, 14
    num_widths: list[float] = []
    for i, (label, _) in enumerate(columns[1:]):
        widest = stringWidth(label, ctx.fonts.base_bold, 8) + pad
        for row in rows_text:
            widest = max(widest, text_width(row[i], size) + pad)
        num_widths.append(min(max(widest, 14 * mm), 40 * mm))
    desc_w = width - sum(num_widths)
    if desc_w < 60 * mm:
        scale = (width - 60 * mm) / sum(num_widths)
        num_widths = [w * scale for w in num_widths]
        desc_w = 60 * mm

    header = [Paragraph(label, ctx.styles["head" if align == "l" else "head_r"]) for label, align in columns]
    data: list[list[Any]] = [header]
    desc_room = desc_w - 12.5  # minus cell padding
    for it, row in zip(items, rows_text, strict=True):
        text = clean_text(it.description).strip() or "\u2014"
        desc: str | Paragraph
        if (
            len(text) < 200
            and "\n" not in text
            and covered_by_primary(text)
            and stringWidth(text, ctx.fonts.base, size) <= desc_room
        ):
            desc = text  # one line in the primary font: a plain string, much faster than a Paragraph
        else:
            desc = _p(ctx, text, "cell", limit=MAX_DESCRIPTION_CHARS, lines=MAX_DESCRIPTION_LINES)
        data.append([desc, *(_plain_cell(ctx, t) for t in row)])
    if not items:
        data.append([Paragraph("No line items", ctx.styles["small"])] + [""] * (len(columns) - 1))

    style = [
        ("BACKGROUND", (0, 0), (-1, 0), ctx.brand),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("VALIGN", (0, 0), (-1, 0), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, 0), 5),
        ("BOTTOMPADDING", (0, 0), (-1, 0), 5),
        ("TOPPADDING", (0, 1), (-1, -1), 3),
        ("BOTTOMPADDING", (0, 1), (-1, -1), 3.5),
        ("LEFTPADDING", (0, 0), (-1, -1), 6),
        ("RIGHTPADDING", (0, 0), (-1, -1), 6),
        ("LINEBELOW", (0, 1), (-1, -1), 0.4, RULE),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [WHITE, ZEBRA]),
        ("FONTNAME", (0, 1), (-1, -1), ctx.fonts.base),
        ("FONTSIZE", (0, 1), (-1, -1), 8.5),
        ("LEADING", (0, 1), (-1, -1), 10.5),
        ("TEXTCOLOR", (0, 1), (-1, -1), INK),
        ("ALIGN", (1, 0), (-1, -1), "RIGHT"),
    ]
    table = _ItemsTable(data, colWidths=[desc_w, *num_widths], repeatRows=1, splitByRow=1, splitInRow=1, hAlign="LEFT")
    table.setStyle(TableStyle(style))
    return table


def _totals(ctx: _Ctx, width: float) -> list[Flowable]:
    doc = ctx.doc
    s = ctx.styles
    rows: list[list[Any]] = [
        [Paragraph("Subtotal", s["tot_label"]), _num_cell(ctx, ctx.money(doc.subtotal), "tot_value")]
    ]
    if doc.discount_amount:
        rows.append(
            [
                Paragraph("Discount", s["tot_label"]),
                _num_cell(ctx, ctx.money(-doc.discount_amount), "tot_value"),
            ]
        )
    if doc.tax_amount or doc.tax_rate:
        label = f"Tax ({format_rate(doc.tax_rate, ctx.locale)})" if doc.tax_rate is not None else "Tax"
        rows.append([_p(ctx, label, "tot_label"), _num_cell(ctx, ctx.money(doc.tax_amount), "tot_value")])
    total_row = len(rows)
    rows.append([Paragraph("Total", s["tot_label_b"]), _num_cell(ctx, ctx.money(doc.total), "tot_value_b")])
    if doc.amount_paid:
        rows.append(
            [
                Paragraph("Amount paid", s["tot_label"]),
                _num_cell(ctx, ctx.money(-doc.amount_paid), "tot_value"),
            ]
        )
    rows.append([Paragraph("Amount due", s["due_row_l"]), _num_cell(ctx, ctx.money(doc.amount_due), "due_row_r")])
    due_row = len(rows) - 1

    box_w = min(TOTALS_WIDTH, width)
    widest = max(text_width(ctx.money(v), 10.5, bold=True) for v in (doc.total, doc.amount_due, doc.subtotal))
    value_w = min(max(34 * mm, widest + 14), box_w - 28 * mm)
    table = Table(rows, colWidths=[box_w - value_w, value_w], hAlign="RIGHT")
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("LEFTPADDING", (0, 0), (-1, -1), 6),
                ("RIGHTPADDING", (0, 0), (-1, -1), 6),
                ("TOPPADDING", (0, 0), (-1, -1), 3),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
                ("LINEABOVE", (0, total_row), (-1, total_row), 1.2, ctx.brand),
                ("TOPPADDING", (0, total_row), (-1, total_row), 5),
                ("BACKGROUND", (0, due_row), (-1, due_row), ctx.brand),
                ("TOPPADDING", (0, due_row), (-1, due_row), 6),
                ("BOTTOMPADDING", (0, due_row), (-1, due_row), 6),
            ]
        )
    )
    return [table]


def _text_section(ctx: _Ctx, title: str, text: str | None, *, first: bool = False) -> list[Flowable]:
    text = clean_text(text).strip()
    if not text:
        return []
    return [
        Spacer(1, 1 * mm if first else 3 * mm),
        Paragraph(title, ctx.styles["section"]),
        _p(ctx, text, "body", limit=MAX_LONG_TEXT_CHARS, lines=MAX_LONG_TEXT_LINES),
    ]


def _closing(ctx: _Ctx, width: float) -> list[Flowable]:
    """Totals box with notes and terms beside it (short) or below it (long)."""
    doc = ctx.doc
    notes = clean_text(doc.notes if doc.notes is not None else ctx.tpl.default_notes).strip()
    terms = clean_text(doc.terms if doc.terms is not None else ctx.tpl.default_terms).strip()
    totals = _totals(ctx, width)
    texts = _text_section(ctx, "Notes", notes, first=True) + _text_section(ctx, "Terms", terms, first=not notes)
    if len(notes) + len(terms) <= SIDE_NOTES_CHARS and width > TOTALS_WIDTH + 50 * mm:
        side = Table(
            [[texts or "", totals]],
            colWidths=[width - TOTALS_WIDTH - 10 * mm, TOTALS_WIDTH + 10 * mm],
            hAlign="LEFT",
        )
        side.setStyle(
            TableStyle(
                [
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("ALIGN", (1, 0), (1, 0), "RIGHT"),
                    ("LEFTPADDING", (0, 0), (-1, -1), 0),
                    ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                    ("TOPPADDING", (0, 0), (-1, -1), 0),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 0),
                ]
            )
        )
        return [Spacer(1, 5 * mm), side]
    return [Spacer(1, 5 * mm), KeepTogether(totals), *texts]


def _payment(ctx: _Ctx, width: float) -> list[Flowable]:
    doc, tpl = ctx.doc, ctx.tpl
    if ctx.status in (InvoiceStatus.PAID, InvoiceStatus.CANCELLED) or doc.amount_due <= 0:
        return []
    url = _safe_url(doc.pay_url)
    instructions = clean_text(tpl.payment_instructions).strip()
    bank = tpl.bank_details if tpl.bank_details and not tpl.bank_details.is_empty() else None
    if not (url or instructions or bank):
        return []

    out: list[Flowable] = [Spacer(1, 4 * mm)]
    heading = Paragraph("How to pay", ctx.styles["section"])
    left: list[Flowable] = []
    if instructions:
        left.append(_p(ctx, instructions, "body", limit=MAX_LONG_TEXT_CHARS, lines=MAX_LONG_TEXT_LINES))
    if bank:
        pairs = [
            ("Account name", bank.account_name),
            ("Bank", bank.bank_name),
            ("IBAN", bank.iban),
            ("BIC / SWIFT", bank.bic),
            ("Account number", bank.account_number),
            ("Routing / sort code", bank.routing_number),
        ]
        rows = [
            [Paragraph(label, ctx.styles["label"]), _p(ctx, value, "cell", limit=MAX_SHORT_CHARS)]
            for label, value in pairs
            if value.strip()
        ]
        bank_table = Table(rows, colWidths=[30 * mm, None], hAlign="LEFT")
        bank_table.setStyle(
            TableStyle(
                [
                    ("LEFTPADDING", (0, 0), (-1, -1), 0),
                    ("TOPPADDING", (0, 0), (-1, -1), 1),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ]
            )
        )
        left.extend([Spacer(1, 2 * mm), bank_table])
    right: list[Flowable] | str = ""
    if url:
        shown = url if len(url) <= 120 else url[:117] + "\u2026"
        link_color = "#" + _text_brand(ctx.accent).hexval()[2:]
        link = f'Pay online: <a href="{_attr(url)}" color="{link_color}"><u>{markup(shown)}</u></a>'
        left.extend([Spacer(1, 2.5 * mm), Paragraph(link, ctx.styles["body"])])
        try:
            qr = _QRCode(url, 30 * mm)
            right = [qr, Spacer(1, 1 * mm), Paragraph("Scan to pay online", ctx.styles["qr_caption"])]
        except Exception as exc:  # data too long for a QR code: the link is still printed
            log.warning("invoice pdf: QR code skipped: %s", exc)
    qr_w = (right[0].width + 4 * mm) if right else 0  # type: ignore[union-attr]
    if instructions and len(instructions) > 1500:
        # long free text flows on its own (it may span pages); bank details and QR stay together
        out.extend([heading, left.pop(0)])
        heading = None  # type: ignore[assignment]
    box = Table([[left, right]], colWidths=[width - qr_w, qr_w] if qr_w else [width, 0], splitInRow=1)
    box.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (0, 0), 0),
                ("RIGHTPADDING", (1, 0), (1, 0), 0),
                ("LEFTPADDING", (1, 0), (1, 0), 4 * mm),
                ("TOPPADDING", (0, 0), (-1, -1), 0),
            ]
        )
    )
    out.append(KeepTogether([heading, box] if heading is not None else [box]))
    return out


def _story(ctx: _Ctx, width: float) -> list[Flowable]:
    story: list[Flowable] = [
        _parties(ctx, width),
        Spacer(1, 5 * mm),
        _summary_strip(ctx, width),
        Spacer(1, 5 * mm),
        _items_table(ctx, width),
        *_closing(ctx, width),
        *_payment(ctx, width),
    ]
    return story


# --------------------------------------------------------------------------- entry point


def _page_size(tpl: TemplateSettings) -> tuple[float, float]:
    if tpl.page_size == "A4":
        return A4
    if tpl.page_size == "LETTER":
        return LETTER
    territory = get_locale(tpl.locale).territory
    return LETTER if territory in LETTER_TERRITORIES else A4


def _status(value: Any) -> InvoiceStatus:
    try:
        return InvoiceStatus(str(getattr(value, "value", value)).strip().upper())
    except ValueError:
        return InvoiceStatus.SENT


def _context(doc: InvoiceDocument, tpl: TemplateSettings, safe: bool) -> _Ctx:
    fonts = get_fontset()
    brand = colors.HexColor(tpl.brand_color)
    accent = colors.HexColor(tpl.accent_color)
    on_brand = _on_color(brand)
    number = clean_text(doc.invoice_number).strip()
    display = f"{clean_text(tpl.number_prefix_display)}{number}" if number else "DRAFT"
    return _Ctx(
        doc=doc,
        tpl=tpl,
        fonts=fonts,
        locale=str(get_locale(tpl.locale)),
        brand=brand,
        accent=accent,
        on_brand=on_brand,
        tint=_mix(brand, WHITE, 0.93),
        page_size=_page_size(tpl),
        margin=18 * mm,
        display_number=display,
        status=_status(doc.status),
        safe=safe,
        styles=_styles(fonts, brand, on_brand),
    )


def _build(doc: InvoiceDocument, tpl: TemplateSettings, safe: bool) -> bytes:
    ctx = _context(doc, tpl, safe)
    page_w, page_h = ctx.page_size
    m = ctx.margin
    first_band, later_band = 32 * mm, 13 * mm
    bottom = 21 * mm
    width = page_w - 2 * m
    first_frame = Frame(
        m,
        bottom,
        width,
        page_h - first_band - 7 * mm - bottom,
        id="first",
        leftPadding=0,
        rightPadding=0,
        topPadding=0,
        bottomPadding=0,
    )
    later_frame = Frame(
        m,
        bottom,
        width,
        page_h - later_band - 8 * mm - bottom,
        id="later",
        leftPadding=0,
        rightPadding=0,
        topPadding=0,
        bottomPadding=0,
    )

    def on_first(c: Canvas, _doc: Any) -> None:
        _draw_common(ctx, c)
        _draw_first_page(ctx, c, first_band)

    def on_later(c: Canvas, _doc: Any) -> None:
        _draw_common(ctx, c)
        _draw_later_page(ctx, c, later_band)

    out = io.BytesIO()
    title = f"Invoice {ctx.display_number}"
    template = BaseDocTemplate(
        out,
        pagesize=ctx.page_size,
        leftMargin=m,
        rightMargin=m,
        topMargin=first_band,
        bottomMargin=bottom,
        title=title,
        author=clean_text(tpl.company_name)[:200],
        subject=f"{title} for {clean_text(doc.client.name)[:200]}",
        creator=RENDERER_VERSION,
        producer=RENDERER_VERSION,
        invariant=1,
        lang=str(get_locale(tpl.locale)).replace("_", "-"),
    )
    template.addPageTemplates(
        [
            PageTemplate(id="first", frames=[first_frame], onPage=on_first, autoNextPageTemplate="later"),
            PageTemplate(id="later", frames=[later_frame], onPage=on_later),
        ]
    )
    template.build(_story(ctx, width), canvasmaker=_numbered_canvas(ctx))
    return out.getvalue()


def render_invoice_pdf(doc: InvoiceDocument, template: TemplateSettings) -> bytes:
    """Render the invoice to PDF bytes. Deterministic for equal inputs.

    Never raises for odd content: if the full layout fails (it should not), a conservative layout
    with capped text and no logo is produced instead.
    """
    try:
        return _build(doc, template, safe=False)
    except Exception:
        log.exception("invoice pdf: full layout failed for %s; using the safe layout", doc.invoice_number)
        return _build(doc, template, safe=True)
