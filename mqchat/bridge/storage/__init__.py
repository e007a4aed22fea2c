"""The SQL store, split by concern (as Synapse's ``storage/databases/main/``).

::

    database.py       one transaction runner per database: run(name, fn, write=...)
    dialect.py        every SQLite / PostgreSQL difference
    streams.py        stream heads: lock, allocate seqs, write, render; lock_covering
    accounts.py       users, password hashes, token revocations
    sends.py          save_messages, read_stream, read_from_cursor, latest_seq
    receipts.py       device cursors, delivered and read watermarks, receipts
    recall.py         recall
    conversations.py  conversations, history, unread counts
    groups.py         groups and membership
    retention.py      the oldest stream entries and unheld messages, deleted in batches
    admin.py          accounts and groups for administrators: roles, disabling, deleting
    push.py           the push outbox: claiming due events, their outcomes, expiry
    health.py         the health write (one row per node)

Every transaction is a plain function of a SQLAlchemy ``Connection``; the concern classes
are combined in ``SqlStore``, which implements ``MessageStore`` (bridge/store.py). Callers
depend on that protocol, not on this package.
"""

from mqchat.bridge.storage.store import SqlStore

__all__ = ["SqlStore"]
