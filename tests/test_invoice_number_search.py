"""`?number=` is a literal substring search (issue 12, defect 8): `%`, `_` and `\\` match only
themselves, through the gateway on the real stack."""

from __future__ import annotations

import httpx


async def _numbers(admin: httpx.AsyncClient, client_id: str, number: str) -> list[str]:
    response = await admin.get("/api/invoices", params={"clientId": client_id, "number": number, "limit": 100})
    assert response.status_code == 200, response.text
    return sorted(i["invoiceNumber"] for i in response.json()["items"])


async def test_like_wildcards_in_the_number_filter_are_literal(admin: httpx.AsyncClient) -> None:
    client = (await admin.post("/api/clients", json={"name": "Wildcard Ltd", "email": "wild@example.com",
                                                     "currency": "EUR"})).json()
    numbers = []
    for _ in range(3):
        invoice = (await admin.post("/api/invoices", json={
            "clientId": client["id"], "items": [{"description": "Work", "unitPrice": 1_000}]})).json()
        sent = await admin.post(f"/api/invoices/{invoice['id']}/send")
        assert sent.status_code == 200, sent.text
        numbers.append(sent.json()["invoiceNumber"])
    numbers.sort()
    year, seq = numbers[0].split("-")

    assert await _numbers(admin, client["id"], f"{year}-") == numbers  # a real substring still matches
    assert await _numbers(admin, client["id"], numbers[1]) == [numbers[1]]
    assert await _numbers(admin, client["id"], seq) == [numbers[0]]
    for pattern in ("%", "_", "%%", "\\", "\\%", f"{year}_", f"{year}%", f"%{seq}", f"{year}_{seq}", "2_2"):
        assert await _numbers(admin, client["id"], pattern) == [], pattern
