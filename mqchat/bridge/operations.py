"""What runs beside the chat service for operators: retention, administration, push hooks.

Created by the composition root with everything else; its background tasks run only in
``mqchat serve`` (``run_server`` starts and stops them), never in one-shot commands such as
``mqchat user add``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqchat.bridge.admin import Administration
from mqchat.bridge.push import PushService
from mqchat.bridge.retention import RetentionPruner


@dataclass(frozen=True)
class Operations:
    retention: RetentionPruner
    admin: Administration
    push: PushService | None = None
    """None unless ``push.webhook_url`` is set."""

    async def start(self) -> None:
        self.retention.start()
        self.admin.start()
        if self.push is not None:
            self.push.start()

    async def stop(self) -> None:
        if self.push is not None:
            await self.push.stop()
        await self.admin.stop()
        await self.retention.stop()
