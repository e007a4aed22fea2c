"""The HTTP bodies share the envelopes' validators: one definition of each rule, in core."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mqchat.api import schemas
from mqchat.core import protocol
from mqchat.core.protocol import Typing

BASE = {"client_msg_id": "c-1", "content": "hi"}


ONE_TARGET_CASES = [
    ({"to_user": "bob"}, True),
    ({"group_id": "g1"}, True),
    ({}, False),
    ({"to_user": "bob", "group_id": "g1"}, False),
]


@pytest.mark.parametrize(("targets", "ok"), ONE_TARGET_CASES)
def test_typing_and_http_sends_take_exactly_one_target(targets: dict[str, str], ok: bool) -> None:
    for build in (
        lambda: schemas.SendBody.model_validate({**BASE, **targets}),
        lambda: Typing.model_validate({"type": "typing", "state": "started", **targets}),
    ):
        if ok:
            build()
        else:
            with pytest.raises(ValidationError, match="give exactly one of to_user and group_id"):
                build()


def test_ids_in_http_bodies_are_the_protocols() -> None:
    assert schemas.UserIdStr is protocol.UserIdStr
    for bad in ("a/b", "", "x" * 65, "a+b"):
        with pytest.raises(ValidationError):
            schemas.Credentials(user_id=bad, password="correct-horse-1")
