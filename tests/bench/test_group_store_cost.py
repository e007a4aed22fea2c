"""``scripts/group_store_cost.py`` (docs/performance.md, "Round 2, second pass") at a small size:
it stores real group messages and prints one table row with a figure for each part."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support.processes import REPO


def test_it_prints_the_cost_of_a_small_group() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "group_store_cost.py"), "--members", "20", "--messages", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 20 |")]
    assert len(rows) == 1, run.stdout
    figures = [float(cell) for cell in re.findall(r"\d+\.\d+", rows[0])]
    assert len(figures) == 3 and all(figure > 0 for figure in figures), rows[0]
