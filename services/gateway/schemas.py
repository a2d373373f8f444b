"""Request and response bodies of the gateway's own endpoints (camelCase on the wire)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 256  # argon2 copes with more; nobody needs more


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class LoginRequest(CamelModel):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)


class UserOut(CamelModel):
    id: uuid.UUID
    email: str
    role: Literal["admin", "client"]
    client_id: str | None = None
    created_at: datetime | None = None


class LoginResponse(CamelModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    user: UserOut


class CreateUserRequest(CamelModel):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)
    role: Literal["admin", "client"]
    client_id: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("email")
    @classmethod
    def _normalize_email(cls, value: str) -> str:
        return value.strip().lower()

    @model_validator(mode="after")
    def _client_binding(self) -> CreateUserRequest:
        if self.role == "client" and not self.client_id:
            raise ValueError("a client login needs a clientId")
        if self.role == "admin" and self.client_id:
            raise ValueError("an admin login cannot be bound to a client")
        return self


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """What every error looks like, on every service: `{"error": {"code", "message", "details"}}`."""

    error: ErrorDetail
