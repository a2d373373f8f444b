"""Demo data for `make run`, created through the public API of the gateway (so it exercises it).

    python -m deploy.seed [--gateway http://127.0.0.1:8000]

Idempotent: when the demo client already exists, its data is left alone; the demo plan is created
when no plan of its name exists. Creates two clients, a client login, invoices in several states
(draft, sent, part-paid, paid, overdue), the plan "Maintenance" (monthly and yearly, in the demo
client's currency, 14 trial days) that the client can subscribe to from the portal's Subscription page,
and the demo client on its monthly price (invoiced, no trial), so every report shows a figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import httpx
from babel.numbers import get_currency_precision

DEMO_CLIENT_EMAIL = "accounts@acme-studio.example.com"
CLIENT_LOGIN = ("client@example.com", "client-password")
DEMO_PLAN = "Maintenance"
DEMO_PLAN_TRIAL_DAYS = 14
# In the demo client's currency (whole units): 150 a month, or 1,500 a year (two months free).
DEMO_PLAN_PRICES = {"month": 150, "year": 1_500}


class Seeder:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def invoice(self, client_id: str, items: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.call("POST", "/api/invoices", json={"clientId": client_id, "items": items,
                                                                         **fields})
        return created

    def clients(self) -> Iterator[dict[str, Any]]:
        """Every client, following the list's cursor page by page."""
        return self.pages("/api/clients")

    def pages(self, path: str, **filters: str) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paged list."""
        params: dict[str, Any] = {"limit": 100, **filters}
        while True:
            page = self.call("GET", path, params=params)
            yield from page["items"]
            if page["nextCursor"] is None:
                return
            params["cursor"] = page["nextCursor"]

    def run(self) -> None:
        demo = next((c for c in self.clients() if c["email"] == DEMO_CLIENT_EMAIL), None)
        if demo is not None:
            print("[seed] demo data already present")
        else:
            demo = self.demo_data()
        try:
            self.demo_plan(str(demo["currency"]))
            self.demo_subscription(str(demo["id"]))
        except RuntimeError as exc:  # subscriptions service not running: the rest of the demo still stands
            print(f"[seed] demo plan skipped: {exc}")

    def demo_subscription(self, client_id: str) -> None:
        """The demo client on the monthly plan, invoiced (no card needed) and without a trial, so the
        MRR report and the dashboard show a figure from the first run: 150 EUR MRR, 1,800 EUR ARR."""
        if any(True for _ in self.pages("/api/subscriptions", clientId=client_id)):
            print("[seed] demo subscription already present")
            return
        plan = next(plan for plan in self.pages("/api/plans") if plan["name"] == DEMO_PLAN)
        monthly = next(price for price in plan["prices"] if price["interval"] == "month")
        self.call("POST", "/api/subscriptions", json={
            "clientId": client_id, "priceId": monthly["id"], "trialDays": 0,
            "collectionMethod": "send_invoice", "daysUntilDue": 14,
        })
        print(f"[seed] demo subscription created: {DEMO_PLAN!r} monthly, invoiced, due in 14 days")

    def demo_plan(self, currency: str) -> None:
        """The plan the demo client can subscribe to (a re-run finds it by name and leaves it)."""
        if any(plan["name"] == DEMO_PLAN for plan in self.pages("/api/plans")):
            print(f"[seed] plan {DEMO_PLAN!r} already present")
            return
        code = currency.upper()
        minor = 10 ** get_currency_precision(code)  # the API takes minor units: 100 for EUR, 1 for JPY
        prices = [
            {"currency": code, "amount": amount * minor, "interval": interval, "trialDays": DEMO_PLAN_TRIAL_DAYS,
             "lookupKey": f"demo_maintenance_{interval}ly_{code.lower()}"}
            for interval, amount in DEMO_PLAN_PRICES.items()
        ]
        self.call("POST", "/api/plans", json={
            "name": DEMO_PLAN,
            "description": "Website care: updates, backups and small changes, every month.",
            "features": ["Security updates and uptime monitoring", "Daily backups",
                         "Up to 4 hours of changes a month", "Next-business-day support"],
            "prices": prices,
        })
        print(f"[seed] plan {DEMO_PLAN!r} created: {DEMO_PLAN_PRICES['month']:,} {code} a month or "
              f"{DEMO_PLAN_PRICES['year']:,} {code} a year, {DEMO_PLAN_TRIAL_DAYS}-day trial")

    def demo_data(self) -> dict[str, Any]:
        acme = self.call(
            "POST",
            "/api/clients",
            json={
                "name": "Acme Studio GmbH",
                "email": DEMO_CLIENT_EMAIL,
                "currency": "EUR",
                "address": "Torstraße 1\n10119 Berlin\nGermany",
                "taxId": "DE123456789",
            },
        )
        globex = self.call(
            "POST",
            "/api/clients",
            json={
                "name": "Globex Corporation",
                "email": "ap@globex.example.com",
                "currency": "USD",
                "address": "1 Globex Way\nCypress Creek, OR",
            },
        )
        self.call(
            "POST",
            "/api/users",
            json={"email": CLIENT_LOGIN[0], "password": CLIENT_LOGIN[1], "role": "client", "clientId": acme["id"]},
        )
        website = [
            {"description": "Website redesign: discovery and UX", "quantity": "16", "unitPrice": 9_500},
            {"description": "Visual design", "quantity": "24", "unitPrice": 9_500, "discountPercent": "10"},
            {"description": "Hosting setup", "quantity": "1", "unitPrice": 25_000, "taxRate": "0"},
        ]
        self.invoice(acme["id"], website, taxRate="19", projectId="web-2026", notes="Draft for review")
        sent = self.invoice(acme["id"], website[:2], taxRate="19", projectId="web-2026")
        self.call("POST", f"/api/invoices/{sent['id']}/send")
        part = self.invoice(globex["id"], [{"description": "Maintenance Q4", "quantity": "3", "unitPrice": 120_000}])
        part = self.call("POST", f"/api/invoices/{part['id']}/send")
        paid = self.invoice(globex["id"], [{"description": "Audit", "quantity": "1", "unitPrice": 80_000}])
        paid = self.call("POST", f"/api/invoices/{paid['id']}/send")
        past = date.today() - timedelta(days=45)
        overdue = self.invoice(
            acme["id"],
            [{"description": "SEO retainer", "quantity": "1", "unitPrice": 60_000}],
            issueDate=past.isoformat(),
            dueDate=(past + timedelta(days=14)).isoformat(),
        )
        self.call("POST", f"/api/invoices/{overdue['id']}/send")
        self.call("POST", "/api/invoices/mark-overdue", json={})
        try:
            self.call(
                "POST",
                f"/api/invoices/{part['id']}/mark-paid",
                json={"amount": 150_000, "method": "bank_transfer", "reference": "WIRE-1001"},
            )
            self.call(
                "POST",
                f"/api/invoices/{paid['id']}/mark-paid",
                json={"amount": paid["total"], "method": "cheque", "reference": "CHQ-77"},
            )
        except RuntimeError as exc:  # payments service not running: the rest of the demo still stands
            print(f"[seed] payments skipped: {exc}")
        print(f"[seed] demo data created: 2 clients, 5 invoices, client login {CLIENT_LOGIN[0]}")
        return acme  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.seed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway", default=os.environ.get("BILLING_GATEWAY_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args(argv)
    password = os.environ.get("BILLING_ADMIN_PASSWORD", "admin-password")
    with httpx.Client(base_url=args.gateway, timeout=30) as http:
        for _ in range(30):
            try:
                login = http.post("/api/auth/login", json={"email": "admin@example.com", "password": password})
                break
            except httpx.TransportError:
                time.sleep(1)
        else:
            print("[seed] gateway not reachable", file=sys.stderr)
            return 1
        if login.status_code != 200:
            print(f"[seed] admin login failed: {login.text}", file=sys.stderr)
            return 1
        http.headers["Authorization"] = f"Bearer {login.json()['accessToken']}"
        try:
            Seeder(http).run()
        except RuntimeError as exc:
            print(f"[seed] failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
