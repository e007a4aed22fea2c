"""The Python SDK of mqchat: ``ChatClient`` (asyncio) and ``SyncChatClient`` (blocking).

It speaks the protocol of ``mqchat.core`` over MQTT (TCP or WebSocket, optionally TLS) with
aiomqtt/paho, and the few HTTP calls it needs over ``urllib``. It imports nothing of the
server (no FastAPI, SQLAlchemy or amqtt). Guide: docs/clients.md.
"""

from mqchat.clients.backoff import Backoff
from mqchat.clients.client import RETRYABLE_CODES, ChatClient
from mqchat.clients.errors import ApiUnavailable, ClientClosed, ClientError, LoginFailed, StoreInUse
from mqchat.clients.gaps import HistoryGap, StreamItem
from mqchat.clients.http import Conversation, Group, HttpApi, Message
from mqchat.clients.store import OutboxEntry
from mqchat.clients.sync import SyncChatClient

__all__ = [
    "RETRYABLE_CODES",
    "ApiUnavailable",
    "Backoff",
    "ChatClient",
    "ClientClosed",
    "ClientError",
    "Conversation",
    "Group",
    "HistoryGap",
    "HttpApi",
    "LoginFailed",
    "Message",
    "OutboxEntry",
    "StoreInUse",
    "StreamItem",
    "SyncChatClient",
]
