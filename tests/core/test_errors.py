"""The error tree says once which errors are retryable; the protocol doc's table agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mqchat.core.errors import (
    ALL_ERRORS,
    ChatError,
    RateLimited,
    ServerBusy,
    StorageUnavailable,
    UnknownRecipient,
    retryable_code,
)

PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
RETRYABLE = {"rate_limited", "server_busy", "storage_unavailable"}


def test_the_retryable_errors_are_the_not_now_refusals() -> None:
    assert {error.code for error in ALL_ERRORS if error.retryable} == RETRYABLE
    assert ServerBusy("busy").retryable and StorageUnavailable("down").retryable
    assert RateLimited("slow down", retry_after=1).retryable
    assert not ChatError("boom").retryable and not UnknownRecipient("who?").retryable


@pytest.mark.parametrize("error", ALL_ERRORS)
def test_retryable_code_answers_for_every_code(error: type[ChatError]) -> None:
    assert retryable_code(error.code) is error.retryable


@pytest.mark.parametrize("code", ["", "SERVER_BUSY", "http_error", "method_not_allowed", "no_such_code"])
def test_unknown_codes_are_not_retryable(code: str) -> None:
    assert retryable_code(code) is False


def test_the_protocol_doc_lists_every_code_with_its_retryability() -> None:
    text = PROTOCOL_DOC.read_text()
    table = text[text.index("| code | parent | HTTP | retryable | sent when |") :].split("\n\n", 1)[0]
    rows = [line.split("|")[1:5] for line in table.splitlines()[2:]]
    documented = {re.sub(r"[`\s]", "", code): retryable.strip() for code, _, _, retryable in rows}
    assert documented == {error.code: "yes" if error.retryable else "no" for error in ALL_ERRORS}
