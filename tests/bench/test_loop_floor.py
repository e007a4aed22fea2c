"""``scripts/loop_floor.py`` (docs/performance.md, "Round 2, fifth pass") at a small size: for
each way of storing, every message is relayed and answered, and the server's CPU is printed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.processes import REPO


@pytest.mark.parametrize("store", ["none", "fsync", "sqlite", "schema"])
def test_it_relays_every_message_and_prints_the_cpu_per_message(store: str) -> None:
    arguments = ["--clients", "20", "--rate", "100", "--duration", "1", "--store", store]
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "loop_floor.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,  # it fails if a message was not delivered
    )
    found = re.fullmatch(rf"store={store} rate=100 sent=(\d+) server CPU [\d.]+ % = (\d+) us per message\n", run.stdout)
    assert found is not None, (run.stdout, run.stderr)
    assert int(found[1]) >= 90  # about 100 in 1 s
