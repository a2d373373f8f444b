"""Events a consumer gave up on (topic billing.deadletter, key = the original subject).

A consumer parks an event here after it failed on every redelivery for a reason other than a domain
refusal, so one poison event cannot stall its partition. The original event is carried whole, for
inspection and replay (publish it again on its topic once the cause is fixed:
`python -m kit.deadletter replay ID`, which then records a `deadletter.replayed` event here, on the
parked event's key, so the topic alone tells what was parked and what was replayed).
"""

from __future__ import annotations

from typing import Any

from contracts import topics
from contracts.base import ContractModel

SCHEMA_V1 = "urn:billing:deadletter:v1"
EVENT_TYPE = "deadletter.parked"
REPLAYED_SCHEMA_V1 = "urn:billing:deadletter-replayed:v1"
REPLAYED_TYPE = "deadletter.replayed"
# Kafka header on a replayed event: the id of the parked event (the deadletter.parked CloudEvent) it came from.
REPLAY_HEADER = "deadletter_parked_id"

# Where an event of a type is published, by the type's first word (for dead letters parked before
# they carried their topic).
TOPIC_BY_TYPE_PREFIX: dict[str, str] = {
    "invoice": topics.INVOICE,
    "payment": topics.PAYMENT,
    "subscription": topics.SUBSCRIPTION,
    "notification": topics.NOTIFICATION,
    "stripe": topics.STRIPE,
}


class DeadLetterV1(ContractModel):
    consumer: str
    event_id: str
    event_type: str
    error: str
    attempts: int
    event: dict[str, Any]
    # The topic the event was read from (absent on dead letters parked before it was recorded).
    topic: str | None = None


class DeadLetterReplayedV1(ContractModel):
    """A parked event was published again on its topic (`parked_id` = the deadletter.parked event's id)."""

    parked_id: str
    consumer: str
    event_id: str
    event_type: str
    topic: str
    forced: bool = False
