"""``scripts/attack_report.py`` at a fiftieth of its sizes: it runs every attack against a real
``mqchat serve`` and prints the table with a row for each (issue 10's report, docs/security.md).
The sizes are too small to reach the limits: what the attacks find is the full run's to say."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from types import ModuleType

import pytest

from tests.support.processes import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SCRIPT = REPO / "scripts" / "attack_report.py"


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attack_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_the_attack_report_runs_every_attack_and_prints_the_table() -> None:
    names = [attack.name for attack in script().attacks(0.02)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--scale", "0.02", "--settle", "1",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 380)
    out = stdout.decode()
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert "| attack | before MiB | peak MiB | after MiB |" in out
    rows: dict[str, str] = {}
    for line in out.splitlines():  # the summary table comes first; the probe details repeat the names
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].removeprefix("| "), line)
    for name in names:
        row = rows.get(name)
        assert row is not None, f"no row for {name!r}:\n{out}"
        before, peak, after = (int(cell) for cell in row.split(" | ")[1:4])
        assert 0 < before <= peak and after <= peak, row
        assert "the attack script failed" not in row and "server exited" not in row, row
        assert re.search(r"\d+ ms (ok|\*\*FAIL\*\*)", row), row  # the innocent user was measured
    assert "0 tracebacks" in out
