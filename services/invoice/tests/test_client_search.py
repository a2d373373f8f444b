"""`GET /api/clients?q=`: the client picker's server-side search (issue 11): name or email contains the
text, in any case, literally; paged like every list, its cursor bound to the search (real PostgreSQL)."""

from __future__ import annotations

import uuid

import httpx


async def test_q_finds_clients_by_name_or_email_and_pages(api: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"Searchable {tag} {i:02d}" for i in range(25)]
    for name in names:
        created = await api.post("/api/clients", json={"name": name, "email": f"x{uuid.uuid4().hex[:6]}@example.com"})
        assert created.status_code == 201, created.text
    by_mail = await api.post("/api/clients", json={"name": "Other name", "email": f"ap-{tag}@Example.com"})
    assert by_mail.status_code == 201

    first = (await api.get("/api/clients", params={"q": f"SEARCHABLE {tag}", "limit": 20})).json()
    assert first["total"] == 25 and len(first["items"]) == 20 and first["hasMore"]
    assert {c["name"] for c in first["items"]} <= set(names)
    rest = (await api.get("/api/clients", params={"q": f"SEARCHABLE {tag}", "limit": 20,
                                                  "cursor": first["nextCursor"]})).json()
    assert len(rest["items"]) == 5 and not rest["hasMore"]
    assert {c["name"] for c in first["items"] + rest["items"]} == set(names)

    mail = (await api.get("/api/clients", params={"q": f"ap-{tag}@example"})).json()
    assert [c["id"] for c in mail["items"]] == [by_mail.json()["id"]]
    # The cursor of one search is refused under another (it would skip or repeat clients).
    other = await api.get("/api/clients", params={"q": "Other", "cursor": first["nextCursor"]})
    assert other.status_code == 400


async def test_q_is_literal_and_bounded(api: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:8]
    assert (await api.post("/api/clients", json={"name": f"100% {tag}", "email": "pct@example.com"})).status_code == 201
    assert (await api.post("/api/clients", json={"name": f"1000 {tag}", "email": "k@example.com"})).status_code == 201
    found = (await api.get("/api/clients", params={"q": f"0% {tag}"})).json()
    assert [c["name"] for c in found["items"]] == [f"100% {tag}"]  # `%` is no wildcard
    assert (await api.get("/api/clients", params={"q": f"_{tag}"})).json()["total"] == 0
    assert (await api.get("/api/clients", params={"q": "x" * 101})).status_code == 422
    assert (await api.get("/api/clients", params={"q": "a\x00b"})).status_code == 422
