"""The hosted pages: Checkout, the hosted invoice page and the customer portal (plain HTML forms).

Everything shown is HTML-escaped. Buttons are forms that POST to the stand-in, which changes its
state, emits the events Stripe would and redirects (303) like Stripe's pages do.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from deploy.stripe_standin.arith import describe_interval, format_date, format_money

Obj = dict[str, Any]

STYLE = """
 body { font-family: system-ui, sans-serif; background: #f6f9fc; margin: 0; color: #1a1f36; }
 main { max-width: 640px; margin: 6vh auto; background: #fff; border-radius: 8px; padding: 32px;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }
 .banner { background: #fff4d6; color: #6b4e00; padding: 8px 12px; border-radius: 4px; font-size: 13px; }
 .notice { background: #e8f4ff; color: #0a3d73; padding: 8px 12px; border-radius: 4px; margin: 12px 0; }
 .error { background: #fdecea; color: #8a1c12; padding: 8px 12px; border-radius: 4px; margin: 12px 0; }
 h1 { font-size: 20px; margin: 20px 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
 .amount { font-size: 32px; font-weight: 600; margin: 8px 0 16px; }
 table { width: 100%; border-collapse: collapse; font-size: 14px; }
 td, th { text-align: left; padding: 6px 4px; border-bottom: 1px solid #e3e8ee; }
 td.num, th.num { text-align: right; }
 button { padding: 10px 14px; font-size: 15px; border-radius: 6px; border: 0; cursor: pointer; margin: 6px 6px 0 0; }
 .primary { background: #635bff; color: #fff; } .danger { background: #fff; color: #b42318; border: 1px solid #f3c5c0; }
 .plain { background: #fff; color: #425466; border: 1px solid #d8dee4; }
 form.inline { display: inline; } .muted { color: #697386; font-size: 13px; }
 .sub { border: 1px solid #e3e8ee; border-radius: 6px; padding: 12px; margin: 8px 0; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<style>{STYLE}</style></head><body><main>"
        "<div class=\"banner\">Stripe stand-in (local test mode): no real money moves. With a Stripe test key, "
        "Stripe's own hosted page replaces this one.</div>"
        f"{body}</main></body></html>"
    )


def _button(action: str, label: str, css: str, testid: str, fields: dict[str, str] | None = None) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in (fields or {}).items()
    )
    return (f'<form class="inline" method="post" action="{escape(action)}">{hidden}'
            f'<button class="{css}" type="submit" data-testid="{escape(testid)}">{escape(label)}</button></form>')


def _notice(notice: str | None, error: str | None = None) -> str:
    out = ""
    if notice:
        out += f'<div class="notice" data-testid="notice">{escape(notice)}</div>'
    if error:
        out += f'<div class="error" data-testid="error">{escape(error)}</div>'
    return out


def message_page(title: str, message: str) -> str:
    return _page(title, f"<h1>{escape(title)}</h1><p data-testid=\"message\">{escape(message)}</p>")


def _price_text(price: Obj) -> str:
    money = format_money(int(price.get("unit_amount") or 0), str(price["currency"]))
    recurring = price.get("recurring")
    if recurring:
        return f"{money} / {describe_interval(recurring['interval'], int(recurring['interval_count']))}"
    return money


def checkout_page(session: Obj, line_items: list[Obj], product_names: dict[str, str], *,
                  notice: str | None = None, trial_days: int | None = None) -> str:
    base = f"/checkout/{quote(session['id'])}"
    currency = str(session["currency"])
    rows = "".join(
        f"<tr><td>{escape(product_names.get(li['price']['product'], str(li.get('description') or '')))}</td>"
        f"<td class=\"num\">{int(li['quantity'])}</td>"
        f"<td class=\"num\">{escape(_price_text(li['price']))}</td>"
        f"<td class=\"num\">{escape(format_money(int(li['amount_total']), currency))}</td></tr>"
        for li in line_items
    )
    total = format_money(int(session["amount_total"] or 0), currency)
    subscription = session["mode"] == "subscription"
    heading = "Subscribe" if subscription else "Pay"
    body = f"<h1>{escape(heading)}</h1>"
    if session.get("customer_email"):
        body += f'<p class="muted">{escape(str(session["customer_email"]))}</p>'
    body += f'<div class="amount" data-testid="amount">{escape(total)}</div>'
    if subscription and trial_days:
        body += f'<p data-testid="trial">{trial_days}-day free trial, then {escape(total)} per period.</p>'
    body += ("<table><tr><th>Item</th><th class=\"num\">Qty</th><th class=\"num\">Price</th>"
             f"<th class=\"num\">Amount</th></tr>{rows}</table>")
    body += _notice(notice)
    if session["status"] == "open":
        label = "Subscribe" if subscription else f"Pay {total}"
        body += "<p>" + _button(f"{base}/pay", label, "primary", "pay")
        body += _button(f"{base}/decline", "Simulate a declined card", "danger", "decline")
        if session.get("cancel_url"):
            body += _button(f"{base}/cancel", "Cancel", "plain", "cancel")
        body += "</p>"
    else:
        body += f'<p data-testid="closed">This checkout session is {escape(str(session["status"]))}.</p>'
    body += f'<p class="muted">Session {escape(session["id"])}</p>'
    return _page("Checkout (Stripe stand-in)", body)


def invoice_page(invoice: Obj, *, notice: str | None = None, error: str | None = None) -> str:
    currency = str(invoice["currency"])
    base = f"/invoice/{quote(invoice['id'])}"
    rows = "".join(
        f"<tr><td>{escape(str(line.get('description') or ''))}</td>"
        f"<td class=\"muted\">{escape(format_date(int(line['period']['start'])))} – "
        f"{escape(format_date(int(line['period']['end'])))}</td>"
        f"<td class=\"num\">{escape(format_money(int(line['amount']), currency))}</td></tr>"
        for line in invoice["lines"]["data"]
    )
    body = f"<h1>Invoice {escape(str(invoice.get('number') or invoice['id']))}</h1>"
    body += f'<p>Status: <strong data-testid="status">{escape(str(invoice["status"]))}</strong></p>'
    if invoice.get("due_date"):
        body += f"<p>Due {escape(format_date(int(invoice['due_date'])))}</p>"
    due = format_money(int(invoice["amount_due"]), currency)
    body += f'<div class="amount" data-testid="amount">{escape(due)}</div>'
    body += f"<table><tr><th>Description</th><th>Period</th><th class=\"num\">Amount</th></tr>{rows}"
    body += (f"<tr><td colspan=\"2\"><strong>Total</strong></td><td class=\"num\"><strong>"
             f"{escape(format_money(int(invoice['total']), currency))}</strong></td></tr>"
             f"<tr><td colspan=\"2\">Amount paid</td><td class=\"num\">"
             f"{escape(format_money(int(invoice['amount_paid']), currency))}</td></tr></table>")
    body += _notice(notice, error)
    if invoice["status"] == "open":
        body += "<p>" + _button(f"{base}/pay", f"Pay {format_money(int(invoice['amount_remaining']), currency)}",
                                "primary", "pay")
        body += _button(f"{base}/decline", "Simulate a declined card", "danger", "decline") + "</p>"
    return _page(f"Invoice {invoice.get('number') or invoice['id']}", body)


def portal_page(
    session: Obj, customer: Obj, card: str, subscriptions: list[Obj], invoices: list[Obj],
    options: dict[str, list[Obj]], product_names: dict[str, str], *, notice: str | None = None,
    error: str | None = None,
) -> str:
    base = f"/portal/{quote(session['id'])}"
    body = f"<h1>{escape(str(customer.get('name') or customer.get('email') or customer['id']))}</h1>"
    if customer.get("email"):
        body += f'<p class="muted">{escape(str(customer["email"]))}</p>'
    body += _notice(notice, error)
    body += "<h2>Payment method</h2>"
    card_text = {"succeed": "Visa ending in 4242 (payments succeed)",
                 "decline": "Visa ending in 0002 (payments are declined)",
                 "none": "No payment method"}.get(card, card)
    body += f'<p data-testid="card">{escape(card_text)}</p><p>'
    body += _button(f"{base}/card", "Update payment method: a working card", "plain", "card-succeed",
                    {"outcome": "succeed"})
    body += _button(f"{base}/card", "Update payment method: a card that declines", "plain", "card-decline",
                    {"outcome": "decline"})
    body += "</p><h2>Subscriptions</h2>"
    if not subscriptions:
        body += '<p class="muted">No subscriptions.</p>'
    for sub in subscriptions:
        item = sub["items"]["data"][0]
        price = item["price"]
        name = product_names.get(price["product"], price["product"])
        sub_base = f"{base}/subscriptions/{quote(sub['id'])}"
        body += f'<div class="sub" data-testid="subscription-{escape(sub["id"])}">'
        body += (f"<strong>{escape(str(name))}</strong> × {int(item.get('quantity') or 1)} · "
                 f"{escape(_price_text(price))} · <span data-testid=\"sub-status\">{escape(str(sub['status']))}"
                 "</span>")
        if sub["status"] in ("canceled", "incomplete_expired"):
            body += "</div>"
            continue
        if sub.get("trial_end") and sub["status"] == "trialing":
            body += f"<br><span class=\"muted\">Trial ends {escape(format_date(int(sub['trial_end'])))}</span>"
        period_end = escape(format_date(int(item["current_period_end"])))
        if sub.get("cancel_at_period_end"):
            body += f"<br><span class=\"muted\">Cancels on {period_end}</span><br>"
            body += _button(f"{sub_base}/renew", "Don't cancel", "plain", "renew")
        else:
            body += f"<br><span class=\"muted\">Renews on {period_end}</span><br>"
            body += _button(f"{sub_base}/cancel", "Cancel at period end", "danger", "cancel")
        choices = [pr for pr in options.get(sub["id"], []) if pr["id"] != price["id"]]
        if choices:
            select = "".join(f'<option value="{escape(pr["id"])}">{escape(_price_text(pr))}'
                             f'{escape(" (" + str(pr["nickname"]) + ")") if pr.get("nickname") else ""}</option>'
                             for pr in choices)
            body += (f'<form class="inline" method="post" action="{escape(sub_base)}/switch">'
                     f'<select name="price" data-testid="switch-price">{select}</select>'
                     '<button class="primary" type="submit" data-testid="switch">Switch plan</button></form>')
        body += "</div>"
    body += "<h2>Invoices</h2>"
    if invoices:
        body += "<table><tr><th>Number</th><th>Date</th><th>Status</th><th class=\"num\">Amount</th></tr>"
        for inv in invoices:
            link = inv.get("hosted_invoice_url")
            number = escape(str(inv.get("number") or inv["id"]))
            label = f'<a href="{escape(str(link))}">{number}</a>' if link else number
            body += (f"<tr><td>{label}</td><td>{escape(format_date(int(inv['created'])))}</td>"
                     f"<td>{escape(str(inv['status']))}</td><td class=\"num\">"
                     f"{escape(format_money(int(inv['total']), str(inv['currency'])))}</td></tr>")
        body += "</table>"
    else:
        body += '<p class="muted">No invoices.</p>'
    if session.get("return_url"):
        body += f'<p><a href="{escape(str(session["return_url"]))}" data-testid="return">← Return</a></p>'
    return _page("Billing portal (Stripe stand-in)", body)
