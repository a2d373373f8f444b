"""Settings shared by every service; each service subclasses with its own env prefix."""

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Common knobs. A subclass sets `model_config = SettingsConfigDict(env_prefix="INVOICE_")`."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: str = "service"
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/postgres"
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Shared secret the gateway sends on every proxied call; unset means "trust the network".
    internal_token: str | None = Field(
        default=None, validation_alias=AliasChoices("BILLING_INTERNAL_TOKEN")
    )
    log_level: str = "INFO"
    log_json: bool = False
    migrate_on_start: bool = True
    kafka_enabled: bool = True
    # Off lets an operator run the relay elsewhere; tests use it to stop between commit and publish.
    relay_enabled: bool = True
    # "process": the relay runs in a child process of the service (its own GIL: commit -> Kafka does not
    # queue behind request handling); "thread": in a thread of the service's process (kit.outbox).
    relay_mode: Literal["process", "thread"] = "process"
    outbox_poll_interval: float = 1.0
    # Kafka consumer group; empty means the service name. Replicas of one deployment share it.
    consumer_group: str = ""
    db_pool_size: int = 10

    @property
    def group_id(self) -> str:
        return self.consumer_group or self.service_name
