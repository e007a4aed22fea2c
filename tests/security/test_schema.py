"""schemathesis against the running server's own OpenAPI schema: no request gets a 5xx.

Every operation, with valid (positive) and invalid (negative) inputs, authenticated as a
user who has a conversation and a group (so ids in paths sometimes hit real rows). The
run is bounded: ``EXAMPLES`` per operation and mode. schemathesis is synchronous (it uses
requests), so it runs in a worker thread while the server keeps serving on the loop.
"""

from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from mqchat.runner import RunningServer
from tests.support.accounts import http_client, register

EXAMPLES = 12


def _fuzz(base_url: str, token: str) -> tuple[int, list[str]]:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        # A long-poll would wait its whole timeout on every example.
        query = {"timeout": 0} if operation.path.endswith("/long-poll") else None
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(mode, headers={"Authorization": f"Bearer {token}"}, query=query)

            @given(strategy)
            @settings(
                max_examples=EXAMPLES,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=base_url, timeout=15)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}"
                    )

            try:
                run()
            except Unsatisfiable:
                # Nothing to get wrong (e.g. GET /healthz has no inputs): no negative cases exist.
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    return calls, failures


@pytest.mark.timeout(240)
async def test_no_operation_answers_5xx(server: RunningServer) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    # An administrator, so that the /v1/admin routes are fuzzed past their role check too.
    await server.services.ops.admin.set_role("alice", "admin")
    async with http_client(server, alice) as http:
        await http.post("/v1/messages", json={"client_msg_id": "seed", "to_user": "bob", "content": "hi"})
        await http.post("/v1/groups", json={"name": "seed", "members": ["bob"]})
    calls, failures = await asyncio.to_thread(_fuzz, f"http://127.0.0.1:{server.http_port}", alice)
    assert calls > 100
    assert not failures, "\n".join(failures[:20])
