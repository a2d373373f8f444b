"""CloudEvents 1.0 structured-mode envelope used on every topic."""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from contracts.base import ContractModel

CONTENT_TYPE = "application/cloudevents+json"

P = TypeVar("P", bound=ContractModel)


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    source: str
    type: str
    subject: str | None = None
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: str = "application/json"
    dataschema: str | None = None
    correlationid: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        source: str,
        type: str,
        subject: str,
        data: ContractModel,
        correlation_id: str | None = None,
        dataschema: str | None = None,
    ) -> CloudEvent:
        return cls(
            source=source,
            type=type,
            subject=subject,
            data=data.model_dump(mode="json", by_alias=True),
            correlationid=correlation_id,
            dataschema=dataschema,
        )

    def data_as(self, model: builtins.type[P]) -> P:  # `type` alone is the field below
        return model.model_validate(self.data)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
