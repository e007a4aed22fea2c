"""``mqchat.core`` must stay free of frameworks and I/O libraries."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, mqchat.core.protocol, mqchat.core.errors, mqchat.core.topics, mqchat.core.ids\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'sqlmodel', 'amqtt', 'uvicorn', 'asyncpg', 'aiosqlite')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
