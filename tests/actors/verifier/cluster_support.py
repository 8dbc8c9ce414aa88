"""Shared by the cluster-mode tests (test_leases.py, test_failover_*.py): agent rows, task monitors."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import trio

from keytrio.actors.verifier import records
from keytrio.actors.verifier.schema import agents as agents_table

VID = "cluster"


def agent_row(agent_id: str) -> dict[str, Any]:
    filler = {sa.String: "x", sa.Text: "x", sa.Integer: 0, sa.Float: 0.0, sa.Boolean: False}
    row: dict[str, Any] = {}
    for col in agents_table.columns:
        if not col.nullable and col.default is None and col.server_default is None:
            row[col.name] = next(v for t, v in filler.items() if isinstance(col.type, t))
    return {**row, "agent_id": agent_id, "verifier_id": VID, "ip": "127.0.0.1", "port": 9002,
            "operational_state": records.GET_QUOTE}


class TaskMonitors:
    """Starts one task per agent that parks until cancelled, keeping the fence it inherited."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scopes: dict[str, trio.CancelScope] = {}
        self.fences: dict[str, records.Fence | None] = {}

    @property
    def running(self) -> set[str]:
        return set(self.scopes)

    def start(self, agent_id: str) -> None:
        scope = trio.CancelScope()
        self.scopes[agent_id] = scope

        async def monitor() -> None:
            with scope:
                self.fences[agent_id] = records.current_fence()
                await trio.sleep_forever()

        self.nursery.start_soon(monitor)

    def stop(self, agent_id: str) -> None:
        scope = self.scopes.pop(agent_id, None)
        if scope is not None:
            scope.cancel()
