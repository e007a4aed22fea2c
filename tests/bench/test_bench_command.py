"""``mqchat bench`` end to end, small: it runs, writes JSON, and counts every message once.

No speed is asserted: the figures live in docs/performance.md, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("targets", ["mqchat,amqtt"])
def test_bench_delivers_every_message_exactly_once(tmp_path: Path, targets: str) -> None:
    args = ["--targets", targets, "--clients", "6", "--rate", "60", "--duration", "2", "--drain", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "mqchat.cli", "bench", *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "delivered msgs/s" in done.stdout and "mqchat/amqtt" in done.stdout
    [report] = tmp_path.glob("bench-*.json")
    results = {r["target"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {"mqchat", "amqtt"}
    for result in results.values():
        assert result["connect_failed"] == 0
        assert result["sent"] > 0
        assert result["lost"] == 0
        assert result["duplicated"] == 0
        assert result["deliveries"] == result["sent"]
    assert results["mqchat"]["ack_p50_ms"] is not None  # every send got its stored-ack
