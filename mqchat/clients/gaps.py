"""``HistoryGap``: what ``events()`` yields when the server no longer has part of the stream.

Retention (``retention.days``) deletes the oldest entries of a stream. A device whose cursor
points before what is kept is answered ``cursor_expired`` (docs/protocol.md, "cursor_expired:
resetting a device"); the client then resets its cursor to ``oldest_seq - 1``, reads on from
there, and tells the application with this item, in its place in the stream: after every event
it had before the gap, before the first kept one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from mqchat.core.protocol import AnyStreamEvent


@dataclass(frozen=True, slots=True)
class HistoryGap:
    """Events ``previous_cursor + 1`` to ``oldest_seq - 1`` of ``stream`` were deleted on the
    server before this device read them: they will never be delivered.

    It has a ``type`` and a ``seq`` like the stream events, so code that dispatches on those
    keeps working: ``seq`` is the reset point ``oldest_seq - 1``, and taking the item moves the
    cursor there (the ack that tells the server this device is past the gap)."""

    stream: str
    """The user whose stream it is (each user has one, shared by the user's devices)."""
    previous_cursor: int
    """The highest seq this device had processed without a hole before the reset."""
    oldest_seq: int
    """The oldest seq the server still holds (``latest_seq + 1`` when it holds none)."""
    latest_seq: int
    """The head of the stream when the server answered."""
    type: Literal["history_gap"] = "history_gap"

    @property
    def seq(self) -> int:
        return self.oldest_seq - 1

    @property
    def missing(self) -> range:
        """The seqs this device will never receive."""
        return range(self.previous_cursor + 1, self.oldest_seq)


StreamItem: TypeAlias = AnyStreamEvent | HistoryGap
"""What ``ChatClient.events()`` yields: the stream's events, and a ``HistoryGap`` where the
server's history no longer reaches back to the device's cursor."""
