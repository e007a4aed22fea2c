"""What runs beside the chat service for operators: the retention pruner and administration.

Created by the composition root with everything else; its background tasks run only in
``mqchat serve`` (``run_server`` starts and stops them), never in one-shot commands such as
``mqchat user add``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqchat.bridge.admin import Administration
from mqchat.bridge.retention import RetentionPruner


@dataclass(frozen=True)
class Operations:
    retention: RetentionPruner
    admin: Administration

    async def start(self) -> None:
        self.retention.start()
        self.admin.start()

    async def stop(self) -> None:
        await self.admin.stop()
        await self.retention.stop()
