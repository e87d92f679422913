"""Keyed actors for the tests of configs, the command line and tracing."""

from __future__ import annotations

from typing import Any

import pgbus


class Account(pgbus.Entity):
    """Adds ``amount`` to the balance; replies with the balance. ``{"fail": true}`` raises."""

    kind = "bank"

    async def handle(self, message: Any) -> Any:
        if message.get("fail"):
            raise ValueError("refused on purpose")
        self.state["balance"] = self.state.get("balance", 0) + message["amount"]
        if message.get("forward"):
            self.tell(self.kind, message["forward"], {"amount": message["amount"]})
        return self.state["balance"]


class NotAnEntity:
    kind = "bank"
