"""Who wrote an event: a MAC that lets a device tell the server's events from forgeries.

MQTT 3.1.1 carries no publisher identity, so a device trusts whatever arrives on its
stream topic. The broker's ACL is what keeps other clients off that topic; this is the
second wall, for the day the first one has a hole (a Last Will once went around it).

Every event the server publishes on ``chat/user/{user}`` and ``chat/device/{user}/{device}``
ends with a ``"sig"`` field: HMAC-SHA256, under the user's *event key*, of the payload as it
would be without that field. The event key is derived from the server secret and the user
id, and handed to the user at login (``POST /v1/token``), so only the server and that
user's own devices can make a valid ``sig`` for that user's topics. Group and presence
topics are shared by many users and carry no ``sig``; they hold only ephemeral state
(typing, presence), never stream events.

Wire form: ``{...fields...,"sig":"<base64url, no padding>"}``, the ``sig`` always last, so
a verifier strips it textually (no JSON re-encoding, which would not be byte-identical).
"""

from __future__ import annotations

import base64
import binascii
import hmac

_KEY_LABEL = b"mqchat event key v1:"
_SIG_OPEN = b',"sig":"'
_SIG_CLOSE = b'"}'
_SIG_CHARS = 43  # base64url of 32 bytes, without padding
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def event_key(secret: bytes, user_id: str) -> bytes:
    """The key that signs ``user_id``'s events (32 bytes)."""
    return hmac.digest(secret, _KEY_LABEL + user_id.encode(), "sha256")


def encode_key(key: bytes) -> str:
    """An event key as clients receive it (base64url, no padding)."""
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


def decode_key(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: bytes) -> bytes:
    # base64.urlsafe_b64encode's own steps, without its argument checks: this runs once per
    # member of a group for every group message.
    return binascii.b2a_base64(hmac.digest(key, body, "sha256"), newline=False).translate(_URLSAFE)[:_SIG_CHARS]


def sign(key: bytes, payload: bytes) -> bytes:
    """``payload`` (a JSON object) with its ``sig`` appended as the last field."""
    if not payload.endswith(b"}") or len(payload) < 2:
        raise ValueError("only a JSON object can be signed")
    return payload[:-1] + _SIG_OPEN + _mac(key, payload) + _SIG_CLOSE


def verify(key: bytes, payload: bytes) -> bytes | None:
    """The payload without its ``sig`` if the ``sig`` is the server's, else None."""
    cut = payload.rfind(_SIG_OPEN)
    if cut < 1 or not payload.endswith(_SIG_CLOSE):
        return None
    mac = payload[cut + len(_SIG_OPEN) : -len(_SIG_CLOSE)]
    body = payload[:cut] + b"}"
    return body if hmac.compare_digest(mac, _mac(key, body)) else None
