"""Identifiers that become MQTT topic levels, checked when they are made."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mqchat.core.errors import InvalidCommand

# No '/', '+', '#', NUL or whitespace can get through this pattern, so an id can
# never widen a topic or a topic filter.
ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str) -> bool:
    return _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not is_valid_id(value):
        raise InvalidCommand(f"{what} must match {ID_PATTERN}")
    return value


@dataclass(frozen=True, slots=True)
class DeviceAddress:
    """One device of one user: the MQTT client id is ``{user_id}:{device_id}``."""

    user_id: str
    device_id: str

    def __post_init__(self) -> None:
        check_id(self.user_id, "user_id")
        check_id(self.device_id, "device_id")

    @property
    def client_id(self) -> str:
        return f"{self.user_id}:{self.device_id}"

    @classmethod
    def from_client_id(cls, client_id: str) -> DeviceAddress:
        user_id, sep, device_id = client_id.partition(":")
        if not sep:
            raise InvalidCommand("client id must be {user_id}:{device_id}")
        return cls(user_id, device_id)
