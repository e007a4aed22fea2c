"""``mqchat backup`` of a serving database, under traffic, and its restore: every message acked
before the backup began is in it, streams stay gapless, and a restore refuses to run under a
server. SQLite (the online backup API, ``mqchat restore``) and PostgreSQL (pg_dump, pg_restore)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.bridge.composition import build_services
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.storage import backup as backup_module
from mqchat.bridge.storage.backup import BackupError
from mqchat.bridge.storage.schema import head
from mqchat.bridge.store import SendOutcome, SendRequest
from mqchat.config import Settings
from tests.support.postgres import drop_database as _drop_pg_database
from tests.support.postgres import fresh_database as _fresh_pg_database
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
SENDERS = 4
UNLIMITED_ENV = {
    f"MQCHAT_LIMITS__{key}": "100000"
    for key in ("SEND_RATE_PER_SECOND", "SEND_BURST", "USER_SEND_RATE_PER_SECOND", "USER_SEND_BURST",
                "COMMAND_RATE_PER_SECOND", "COMMAND_BURST")
}  # fmt: skip


async def mqchat(*args: str) -> tuple[int, str, str]:
    """A separate ``mqchat`` process, as an operator runs it beside the server."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqchat.cli", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Traffic:
    """Senders writing to bob over HTTP as fast as the server acks; ``acked`` grows as acks arrive."""

    def __init__(self, server: ServerProcess, tokens: dict[str, str]) -> None:
        self.acked: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._send(server, name, token)) for name, token in tokens.items()]

    async def _send(self, server: ServerProcess, name: str, token: str) -> None:
        async with server.http(token) as http:
            for n in range(1_000_000):
                if self._stop.is_set():
                    return
                body = {"client_msg_id": f"{name}-{n}", "to_user": "bob", "content": f"message {n} from {name}"}
                sent = await http.post("/v1/messages", json=body)
                assert sent.status_code == 200, sent.text
                self.acked.append(body["client_msg_id"])

    async def until(self, count: int) -> None:
        async with asyncio.timeout(60):
            while len(self.acked) < count:
                await asyncio.gather(*(t for t in self._tasks if t.done()))  # a failed sender fails the test
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


async def test_a_backup_under_traffic_holds_everything_acked_before_it_began(tmp_path: Path, database_url: str) -> None:
    data, backup = tmp_path / "data", tmp_path / "backups" / "mqchat.backup"
    flags = ["--data-dir", str(data), "--database-url", database_url]
    sqlite = database_url.startswith("sqlite")
    async with ServerProcess(data, database_url, UNLIMITED_ENV) as server:
        await server.register("bob")
        traffic = Traffic(server, {f"s{i}": await server.register(f"s{i}") for i in range(SENDERS)})
        try:
            await traffic.until(200)
            before = set(traffic.acked)  # every message acked before the backup began
            code, out, err = await mqchat("backup", str(backup), *flags)
            assert code == 0, err
            during = len(traffic.acked) - len(before)
            await traffic.until(len(traffic.acked) + 50)  # the server went on writing all along
            await traffic.stop()
        finally:
            traffic.cancel()
        assert during > 0, "no message was acked while the backup ran: it did not run under traffic"
        if sqlite:
            assert out.startswith("backed up ") and f"mqchat.db to {backup} in " in out and f"schema {head()}," in out
            assert backup.stat().st_mode & 0o777 == 0o600
            # A restore under a running server is refused, and changes nothing.
            code, _, err = await mqchat("restore", str(backup), *flags)
            assert code == 1 and "is using" in err and err.count("\n") == 1, err
        else:
            assert out.startswith(f"backed up the PostgreSQL database to {backup} with pg_dump")

    async with restored(backup, flags, database_url) as url:
        store = SqlStore.from_url(url)
        try:
            await store.migrate()
            events, latest = [], None
            while latest is None or (events and events[-1].seq < latest):
                page = await store.read_stream("bob", events[-1].seq if events else 0, 500)
                events += page.events
                latest = page.latest_seq
            assert [e.seq for e in events] == list(range(1, latest + 1))  # gapless, consistent
            kept = {getattr(e, "client_msg_id", None) for e in events}
            assert before <= kept, f"{len(before - kept)} acked messages are missing"
            # The restored database goes on where it stopped.
            [outcome] = await store.save_messages([SendRequest("s0", "after-restore", "x", "text", to_user="bob")])
            assert isinstance(outcome, SendOutcome) and outcome.events[-1][1].seq == latest + 1
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def restored(backup: Path, flags: list[str], database_url: str) -> AsyncIterator[str]:
    """The restored database's URL: ``mqchat restore`` in place for SQLite, pg_restore into a
    fresh database for PostgreSQL (as docs/operations.md says)."""
    if database_url.startswith("sqlite"):
        code, out, err = await mqchat("restore", str(backup), *flags)
        assert code == 0, err
        assert "the database it replaced is kept as" in out
        yield database_url
        return
    url, name = await _fresh_pg_database()
    try:
        dbname = url.rpartition("/")[2]
        host = url.split("@")[1].split("/")[0]
        restore = await asyncio.create_subprocess_exec(
            "pg_restore", "--no-owner", "--exit-on-error", "-h", host.split(":")[0], "-p", host.split(":")[1],
            "-U", url.split("//")[1].split("@")[0], "-d", dbname, str(backup),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await restore.communicate()
        assert restore.returncode == 0, err.decode()
        yield url
    finally:
        await _drop_pg_database(name)


async def test_restore_refuses_what_is_not_an_mqchat_backup_and_postgresql(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()  # commands other than serve refuse a data dir that does not exist
    flags = ["--data-dir", str(tmp_path / "data")]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    code, _, err = await mqchat("restore", str(junk), *flags)
    assert code == 1 and "is not an mqchat backup" in err
    code, _, err = await mqchat("restore", str(tmp_path / "missing.db"), *flags)
    assert code == 1 and "there is no backup at" in err
    code, _, err = await mqchat("restore", str(junk), *flags, "--database-url", "postgresql+asyncpg://u@h/db")
    assert code == 1 and "pg_restore" in err and "docs/operations.md" in err
    assert not (tmp_path / "data" / "mqchat.db").exists()


async def test_no_mqchat_command_opens_a_database_being_restored(tmp_path: Path) -> None:
    settings = Settings.load(None, data_dir=tmp_path / "data")
    database = tmp_path / "data" / "mqchat.db"
    with backup_module._locked(database, fcntl.LOCK_EX) as held:  # what a restore holds
        assert held
        with pytest.raises(BackupError, match=r"a restore of .* is in progress"):
            async with build_services(settings):
                pass
    async with build_services(settings) as services:  # and once it is done, all is well
        await services.store.ping()
