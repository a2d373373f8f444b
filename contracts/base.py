from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ContractModel(BaseModel):
    """Payload base: camelCase on the wire, snake_case in Python, unknown fields tolerated."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
