"""amqtt's session, without a state machine library instance per connection.

amqtt 0.12 gives every ``Session`` its own ``transitions.Machine`` for three states and
two triggers: 23 KiB and 1.2 ms of CPU per CONNECT, a third of a connected device's
memory and most of the broker's own CPU while 10,000 devices connect. ``ChatSession``
keeps the same states, transitions and callbacks in a small object with the part of
the Machine's interface amqtt and we call (``state``, ``connect``, ``disconnect``,
``is_connected`` ...), raising the same ``MachineError`` on a transition that is not
allowed.
"""

from __future__ import annotations

from typing import Any

from amqtt.mqtt.protocol import broker_handler
from amqtt.session import Session
from transitions import MachineError

NEW, CONNECTED, DISCONNECTED = "new", "connected", "disconnected"
_CONNECT_FROM = frozenset({NEW, DISCONNECTED})


class SessionState:
    """The three states of an amqtt session and its two triggers."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = NEW

    def connect(self) -> bool:
        if self.state not in _CONNECT_FROM:
            raise MachineError(f'"Can\'t trigger event connect from state {self.state}!"')
        self.state = CONNECTED
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = DISCONNECTED  # allowed from every state
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == NEW

    def is_connected(self) -> bool:
        return self.state == CONNECTED

    def is_disconnected(self) -> bool:
        return self.state == DISCONNECTED

    def __getstate__(self) -> dict[str, Any]:
        return {"session": self._session, "state": self.state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._session = state["session"]
        self.state = state["state"]


class ChatSession(Session):
    def _init_states(self) -> None:
        self.transitions = SessionState(self)


def use_chat_sessions() -> None:
    """Make amqtt's broker-side CONNECT handling create ``ChatSession``s.

    ``BrokerProtocolHandler.init_from_connect`` builds the session from the name
    ``Session`` in its module; rebinding that name is the one way in short of copying
    the method. It touches only the broker side (amqtt's client keeps its sessions).
    """
    broker_handler.Session = ChatSession
