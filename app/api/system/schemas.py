"""What goes over the wire for the system routes."""

from typing import Literal

from pydantic import BaseModel

Dependency = Literal["database", "broker"]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[Dependency, Literal["up", "down"]]
    down: list[Dependency]
