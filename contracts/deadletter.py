"""Events a consumer gave up on (topic billing.deadletter, key = the original subject).

A consumer parks an event here after it failed on every redelivery for a reason other than a domain
refusal, so one poison event cannot stall its partition. The original event is carried whole, for
inspection and replay (publish it again on its topic once the cause is fixed).
"""

from __future__ import annotations

from typing import Any

from contracts.base import ContractModel

SCHEMA_V1 = "urn:billing:deadletter:v1"
EVENT_TYPE = "deadletter.parked"


class DeadLetterV1(ContractModel):
    consumer: str
    event_id: str
    event_type: str
    error: str
    attempts: int
    event: dict[str, Any]
