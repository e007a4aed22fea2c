"""Identifiers that become MQTT topic levels, checked when they are made."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, cast

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


ConversationKind = Literal["user", "group"]
_KINDS = ("user", "group")
CONVERSATION_FORMAT = "'user:{user_id}' or 'group:{group_id}'"


@dataclass(frozen=True, slots=True)
class ConversationId:
    """A conversation as one user sees it: ``user:{peer}`` (``user:{own id}`` for notes to
    self) or ``group:{group_id}``. ``str()`` is the form on the wire and in the database."""

    kind: ConversationKind
    id: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidCommand(f"conversation_id must be {CONVERSATION_FORMAT}")
        check_id(self.id, f"{self.kind}_id")

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"

    @classmethod
    def parse(cls, value: str) -> ConversationId:
        kind, sep, ident = value.partition(":")
        if not sep or kind not in _KINDS or not is_valid_id(ident):
            raise InvalidCommand(f"conversation_id must be {CONVERSATION_FORMAT}")
        return _conversation(cast(ConversationKind, kind), ident)

    @staticmethod
    def user(user_id: str) -> ConversationId:
        return _conversation("user", user_id)

    @staticmethod
    def group(group_id: str) -> ConversationId:
        return _conversation("group", group_id)

    @staticmethod
    def addressed(to_user: str | None, group_id: str | None) -> ConversationId:
        """What a message or a typing signal is addressed to, as its sender sees it."""
        if group_id is not None:
            return _conversation("group", group_id)
        if to_user is None:
            raise InvalidCommand("give exactly one of to_user and group_id")
        return _conversation("user", to_user)

    @staticmethod
    def for_viewer(viewer: str, *, sender: str, to_user: str | None, group_id: str | None) -> ConversationId:
        """A message as ``viewer`` sees it: its group; else the other party of the two
        (the recipient for the sender, the sender for everyone else)."""
        if group_id is None and viewer != sender:
            return _conversation("user", sender)
        return ConversationId.addressed(to_user, group_id)

    def for_peer(self, viewer: str) -> ConversationId:
        """This conversation of ``viewer``'s as the other side sees it: a group is the same
        for every member; ``user:{peer}`` is ``user:{viewer}`` to the peer."""
        return self if self.kind == "group" else _conversation("user", viewer)

    @property
    def group_id(self) -> str | None:
        return self.id if self.kind == "group" else None


@functools.lru_cache(maxsize=4096)
def _conversation(kind: ConversationKind, ident: str) -> ConversationId:
    # Cached: a group message is written to up to 1,000 streams, each row with its
    # conversation id, and checking the same id again for each cost more than the rest.
    # An invalid id raises, and nothing is cached for it.
    return ConversationId(kind, ident)
