"""The invoice template editor (AUI6): branding, texts, locale, logo; a live preview of the real PDF.

The preview is the invoice service's own renderer (`POST /api/invoice-template/preview` with the
unsaved settings). As the admin types, htmx posts the form here; the answer is an <iframe> whose
address carries the settings (compressed, so no server keeps any state and any gateway replica can
answer it), and loading it asks the invoice service for the PDF. Saving creates a new template
version; invoices already sent keep theirs.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Annotated, Any

from babel import Locale, UnknownLocaleError
from fastapi import APIRouter, Query, Request
from starlette.datastructures import FormData, UploadFile
from starlette.responses import Response

from services.gateway.admin.api import ApiError
from services.gateway.admin.common import api, first_error
from services.gateway.admin.models import Template
from services.gateway.admin.web import FRAMABLE_HEADERS, SECURITY_HEADERS, AdminSession, Csrf, redirect, render

router = APIRouter()

TEXT_FIELDS = {  # form name -> (API name, label, max length)
    "company_name": ("companyName", "Company name", 200),
    "company_address": ("companyAddress", "Address", 1000),
    "company_email": ("companyEmail", "Email", 254),
    "company_phone": ("companyPhone", "Phone", 64),
    "company_website": ("companyWebsite", "Website", 254),
    "tax_id": ("taxId", "Tax ID", 64),
    "footer_text": ("footerText", "Footer", 1000),
    "payment_instructions": ("paymentInstructions", "Payment instructions", 4000),
    "default_notes": ("defaultNotes", "Default notes", 4000),
    "default_terms": ("defaultTerms", "Default terms", 4000),
}
BANK_FIELDS = {
    "bank_account_name": ("accountName", "Account name", 200),
    "bank_name": ("bankName", "Bank", 200),
    "bank_iban": ("iban", "IBAN", 64),
    "bank_bic": ("bic", "BIC / SWIFT", 32),
    "bank_account_number": ("accountNumber", "Account number", 64),
    "bank_routing_number": ("routingNumber", "Routing number / sort code", 64),
}
COLOR_FIELDS = {"brand_color": ("brandColor", "Brand colour"), "accent_color": ("accentColor", "Accent colour")}
LOCALE_CHOICES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_PT", "sv_SE", "ja_JP")
PAGE_SIZES = [("auto", "By locale (A4 or Letter)"), ("A4", "A4"), ("LETTER", "Letter")]
MAX_PREVIEW_QUERY = 12_000  # characters of the iframe's address
LOGO_MAX_BYTES = 1024 * 1024  # the invoice service's limit too
LOGO_TYPES = ("image/png", "image/jpeg", "image/svg+xml")
LOGO_TOO_LARGE = "The logo may be 1 MB at most: choose a smaller file."
NOT_AN_IMAGE = "This file is not an image the invoices can show: choose a PNG, JPEG or SVG file."
UNREADABLE_IMAGE = "This file could not be read as a PNG, JPEG or SVG image: choose another file."


def values_of(template: Template) -> dict[str, str]:
    bank = template.bank_details
    out = {
        "company_name": template.company_name, "company_address": template.company_address,
        "company_email": template.company_email, "company_phone": template.company_phone,
        "company_website": template.company_website, "tax_id": template.tax_id,
        "footer_text": template.footer_text, "payment_instructions": template.payment_instructions,
        "default_notes": template.default_notes, "default_terms": template.default_terms,
        "brand_color": template.brand_color, "accent_color": template.accent_color,
        "default_net_days": str(template.default_net_days), "locale": template.locale,
        "page_size": template.page_size, "version": str(template.version), "remove_logo": "",
    }
    for name, (api_name, _, _) in BANK_FIELDS.items():
        out[name] = getattr(bank, _snake(api_name)) if bank else ""
    return out


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def settings_from(form: FormData | dict[str, str]) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """(API body without version, errors by field, the values as typed)."""
    def get(name: str) -> str:
        value = form.get(name)
        return value if isinstance(value, str) else ""

    values = {name: get(name) for name in (*TEXT_FIELDS, *BANK_FIELDS, *COLOR_FIELDS, "default_net_days", "locale",
                                           "page_size", "version", "remove_logo")}
    errors: dict[str, str] = {}
    body: dict[str, Any] = {}
    for name, (api_name, label, limit) in TEXT_FIELDS.items():
        value = values[name].strip()
        if len(value) > limit:
            errors[name] = f"Keep the {label.lower()} under {limit:,} characters."
        body[api_name] = value
    if not body["companyName"]:
        errors["company_name"] = "Enter the company name printed on the invoices."
    bank: dict[str, str] = {}
    for name, (api_name, label, limit) in BANK_FIELDS.items():
        value = values[name].strip()
        if len(value) > limit:
            errors[name] = f"Keep the {label} under {limit} characters."
        bank[api_name] = value
    body["bankDetails"] = bank if any(bank.values()) else None
    for name, (api_name, _) in COLOR_FIELDS.items():
        value = values[name].strip()
        if len(value) != 7 or not value.startswith("#") or any(c not in "0123456789abcdefABCDEF" for c in value[1:]):
            errors[name] = "Choose a colour (#RRGGBB)."
        body[api_name] = value
    days = values["default_net_days"].strip()
    if not days.isdigit() or not 0 <= int(days) <= 365:
        errors["default_net_days"] = "Enter a number of days from 0 to 365."
    else:
        body["defaultNetDays"] = int(days)
    locale = values["locale"].strip().replace("-", "_")
    try:
        Locale.parse(locale)
    except (UnknownLocaleError, ValueError):
        errors["locale"] = "Choose a locale from the list."
    body["locale"] = locale
    if values["page_size"] not in dict(PAGE_SIZES):
        errors["page_size"] = "Choose a page size."
    body["pageSize"] = values["page_size"] or "auto"
    body["removeLogo"] = values["remove_logo"] == "on"
    return body, errors, values


def encode_preview(body: dict[str, Any]) -> str:
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).rstrip(b"=").decode()


def decode_preview(token: str) -> dict[str, Any] | None:
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), bufsize=65536)
        data = json.loads(raw)
    except (ValueError, zlib.error):
        return None
    return data if isinstance(data, dict) else None


def _page(request: Request, session: AdminSession, template: Template | None, values: dict[str, str],
          errors: dict[str, str], *, notice: str | None = None, failure: str | None = None,
          status_code: int = 200, preview: str | None = None) -> Response:
    locales = list(LOCALE_CHOICES)
    if values.get("locale") and values["locale"] not in locales:
        locales.insert(0, values["locale"])
    return render(request, "template.html", {
        "template": template, "values": values, "errors": errors, "notice": notice, "failure": failure,
        "text_fields": TEXT_FIELDS, "bank_fields": BANK_FIELDS, "color_fields": COLOR_FIELDS,
        "locale_options": [(loc, f"{Locale.parse(loc).display_name} ({loc})") for loc in locales],
        "page_sizes": PAGE_SIZES, "preview": preview,
    }, status_code=status_code, session=session)


@router.get("/template")
async def template_page(request: Request, session: AdminSession,
                        saved: Annotated[str | None, Query(max_length=12)] = None,
                        logo: Annotated[str | None, Query(max_length=1)] = None) -> Response:
    try:
        template = await api(request, session).get(Template, "/api/invoice-template")
    except ApiError as exc:
        return render(request, "error.html", {"title": "Template unavailable", "message": first_error(exc)},
                      status_code=503 if exc.unavailable else 502, session=session)
    values = values_of(template)
    body, _, _ = settings_from(values)
    body["removeLogo"] = False
    notice = f"Saved as version {saved}. Invoices sent before keep the version they were sent with." if saved else None
    if saved and logo:
        notice = f"Logo uploaded: {notice}"
    return _page(request, session, template, values, {}, notice=notice, preview=encode_preview(body))


@router.post("/template/preview", dependencies=[Csrf])
async def preview_fragment(request: Request, session: AdminSession) -> Response:
    body, errors, values = settings_from(await request.form())
    token = encode_preview(body) if not errors else None
    if token is not None and len(token) > MAX_PREVIEW_QUERY:
        errors["payment_instructions"] = "These texts are too long to preview at once."
        token = None
    fields = [f for f in values if f not in ("version", "remove_logo")]  # the ones with an error slot
    return render(request, "partials/template_preview.html",
                  {"preview": token, "errors": errors, "oob": True, "fields": fields}, session=session)


@router.get("/template/preview.pdf")
async def preview_pdf(request: Request, session: AdminSession,
                      s: Annotated[str, Query(max_length=MAX_PREVIEW_QUERY)]) -> Response:
    body = decode_preview(s)
    if body is None:
        return render(request, "error.html", {"title": "No preview", "message": "This preview link is broken."},
                      status_code=400, session=session)
    if body.get("removeLogo") is False:
        body.pop("removeLogo")  # omitted = the saved logo
    try:
        upstream = await api(request, session).request("POST", "/api/invoice-template/preview", json=body)
    except ApiError as exc:
        fields = "; ".join(f"{k}: {v}" for k, v in exc.field_errors().items())
        return render(request, "error.html", {"title": "No preview",
                                              "message": fields or first_error(exc)},
                      status_code=exc.status, session=session,
                      headers={"X-Frame-Options": "SAMEORIGIN",
                               "Content-Security-Policy": "default-src 'none'; style-src 'self'; "
                               "frame-ancestors 'self'"})
    return Response(upstream.content, media_type="application/pdf",
                    headers={**FRAMABLE_HEADERS, "Content-Disposition": 'inline; filename="invoice-preview.pdf"'})


@router.post("/template", dependencies=[Csrf])
async def save_template(request: Request, session: AdminSession) -> Response:
    body, errors, values = settings_from(await request.form())
    version = values.get("version", "")
    if version.isdigit():
        body["version"] = int(version)
    a = api(request, session)
    if not errors:
        try:
            saved = await a.put(Template, "/api/invoice-template", body)
        except ApiError as exc:
            if exc.status == 409:
                return _page(request, session, None, values, errors, status_code=409,
                             failure="Someone saved the template meanwhile. Reload the page to edit the newest "
                             "version (your changes here are not saved).")
            errors.update({_form_name(k): v for k, v in exc.field_errors().items()}
                          or {"company_name": first_error(exc)})
        else:
            return redirect(request, f"/admin/template?saved={saved.version}")
    try:
        template: Template | None = await a.get(Template, "/api/invoice-template")
    except ApiError:
        template = None
    return _page(request, session, template, values, errors, status_code=422)


def _form_name(api_field: str) -> str:
    for name, (api_name, *_rest) in {**TEXT_FIELDS, **COLOR_FIELDS}.items():
        if api_field == api_name:
            return name
    for name, (api_name, *_rest) in BANK_FIELDS.items():
        if api_field.endswith(api_name):
            return name
    return {"defaultNetDays": "default_net_days", "locale": "locale", "pageSize": "page_size"}.get(
        api_field, "company_name")


@router.post("/template/logo", dependencies=[Csrf])
async def upload_logo(request: Request, session: AdminSession) -> Response:
    form = await request.form()
    upload = form.get("logo")
    a = api(request, session)
    error = None
    if not isinstance(upload, UploadFile) or not upload.filename:
        error = "Choose an image file (PNG, JPEG or SVG)."
    else:
        data = await upload.read(LOGO_MAX_BYTES + 1)
        content_type = (upload.content_type or "").split(";", 1)[0].strip().lower()
        if len(data) > LOGO_MAX_BYTES:
            error = LOGO_TOO_LARGE
        elif content_type not in LOGO_TYPES:
            error = NOT_AN_IMAGE
        else:
            try:
                saved = await a.request("POST", "/api/invoice-template/logo", content=data,
                                        headers={"Content-Type": content_type})
            except ApiError as exc:
                # The service's words are for API callers (media types, field names): say it plainly.
                error = {413: LOGO_TOO_LARGE, 415: NOT_AN_IMAGE, 422: UNREADABLE_IMAGE}.get(exc.status,
                                                                                        first_error(exc))
            else:
                version = Template.model_validate_json(saved.content).version
                return redirect(request, f"/admin/template?saved={version}&logo=1")
    try:
        template = await a.get(Template, "/api/invoice-template")
    except ApiError as exc:
        return render(request, "error.html", {"title": "Template unavailable", "message": first_error(exc)},
                      status_code=503, session=session)
    values = values_of(template)
    return _page(request, session, template, values, {"logo": error or ""}, status_code=422)


@router.get("/template/logo")
async def logo_image(request: Request, session: AdminSession,
                     version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None) -> Response:
    """The template's logo (of `version`), for the editor's thumbnail: same origin, as the CSP wants."""
    try:
        upstream = await api(request, session).request(
            "GET", "/api/invoice-template/logo", params={"version": version} if version else None)
    except ApiError as exc:
        return Response(status_code=404 if exc.status == 404 else 502, headers=SECURITY_HEADERS)
    media_type = upstream.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in LOGO_TYPES:
        return Response(status_code=502, headers=SECURITY_HEADERS)
    # Shown by an <img> only; opened on its own, nothing in it runs (an SVG's scripts included).
    return Response(upstream.content, media_type=media_type,
                    headers={**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'; sandbox"})
