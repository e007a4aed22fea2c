"""Putting a user's event stream in order, sans-IO.

Events reach a device live and in ``sync_response`` pages, possibly twice, possibly out of
order, possibly with holes (a live delivery lost in transit). The sequencer is fed every
event it sees and hands back, in ``seq`` order, the ones that extend the contiguous prefix;
duplicates are dropped and events after a hole are held until the hole is filled. It knows
nothing about MQTT: the client decides when to ask the server for the missing events.
"""

from __future__ import annotations

from mqchat.core.protocol import AnyStreamEvent


class StreamSequencer:
    def __init__(self, contiguous: int = 0) -> None:
        self._contiguous = contiguous
        self._head = contiguous
        self._held: dict[int, AnyStreamEvent] = {}

    @property
    def contiguous(self) -> int:
        """The highest seq up to which every event has been handed out."""
        return self._contiguous

    @property
    def head(self) -> int:
        """The highest seq known to exist (seen, or announced as ``latest_seq``)."""
        return self._head

    @property
    def behind(self) -> bool:
        """True when events between ``contiguous`` and ``head`` are missing: time to sync."""
        return self._contiguous < self._head

    @property
    def held(self) -> int:
        return len(self._held)

    def note_head(self, latest_seq: int) -> None:
        self._head = max(self._head, latest_seq)

    def reset(self, contiguous: int) -> None:
        """Jump the prefix forward to ``contiguous`` (the server deleted what lay before it):
        held events at or below it are dropped, those after it may now be released by ``offer``."""
        if contiguous <= self._contiguous:
            return
        self._contiguous = contiguous
        self._head = max(self._head, contiguous)
        self._held = {seq: event for seq, event in self._held.items() if seq > contiguous}

    def release(self) -> list[AnyStreamEvent]:
        """The held events that now follow the prefix without a hole, in order."""
        ready: list[AnyStreamEvent] = []
        while self._contiguous + 1 in self._held:
            self._contiguous += 1
            ready.append(self._held.pop(self._contiguous))
        return ready

    def discard(self, seq: int) -> bool:
        """Forget a held event (one found not to be trustworthy): its seq is a hole again."""
        return self._held.pop(seq, None) is not None

    def offer(self, event: AnyStreamEvent) -> list[AnyStreamEvent]:
        """The events, in order, that ``event`` makes contiguous (often just ``[event]``)."""
        seq = event.seq
        self._head = max(self._head, seq)
        if seq <= self._contiguous or seq in self._held:
            return []
        self._held[seq] = event
        return self.release()
