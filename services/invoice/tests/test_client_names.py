"""A client's name and email become email headers (To:) of every message to the client: control
characters in them are a 422 naming the field, and no client is created (real PostgreSQL and Kafka)."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize("char", ["\r\n", "\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9f", "\u2028", "\u2029"])
async def test_a_control_character_in_the_name_is_422_naming_the_field(api: httpx.AsyncClient, char: str) -> None:
    name = f"Evil Ltd{char}Bcc: victim@example.com"
    response = await api.post("/api/clients", json={"name": name, "email": "evil@example.com"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    [detail] = error["details"]
    assert detail["field"] == "name"
    if char != "\x00":  # NUL has its own message (PostgreSQL cannot store it)
        assert detail["type"] == "control_character"
        assert f"U+{ord(char[0]):04X}" in detail["message"]
    listed = await api.get("/api/clients", params={"limit": 100})
    assert all(c["email"] != "evil@example.com" for c in listed.json()["items"])


@pytest.mark.parametrize("email", ["evil@example.com\r\nBcc: victim@example.com", "ev\u2028il@example.com",
                                   "ev\x85il@example.com", "ev\til@example.com"])
async def test_a_control_character_in_the_email_is_422_naming_the_field(api: httpx.AsyncClient, email: str) -> None:
    response = await api.post("/api/clients", json={"name": "Evil Ltd", "email": email})
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["email"]


async def test_names_that_are_one_line_of_any_script_are_fine(api: httpx.AsyncClient) -> None:
    for name in ("Zoë Ünal — Café Ω", "株式会社テスト", "O'Brien & Sons, Ltd.", "  Trimmed Ltd  "):
        response = await api.post("/api/clients", json={"name": name, "email": "fine@example.com"})
        assert response.status_code == 201, response.text
        assert response.json()["name"] == name.strip()
