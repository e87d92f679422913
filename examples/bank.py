"""
Keyed actors: one bank account per key (examples/bank.toml hosts them).

A transfer debits the sending account and, in the same commit, tells the receiving one to
credit the amount: money is never created or lost, whatever crashes when.
"""

from __future__ import annotations

from typing import Any

import pgbus


class Account(pgbus.Entity):
    kind = "account"

    async def handle(self, message: Any) -> Any:
        balance = self.state.get("balance", 0)
        op, amount = message["op"], message.get("amount", 0)
        if not isinstance(amount, int) or amount < 0:
            raise ValueError(f"amount must be a whole number of at least 0 (got {amount!r})")
        if op in ("deposit", "credit"):
            balance += amount
        elif op == "transfer":
            if amount > balance:
                return {"ok": False, "balance": balance, "node": self.bus.node}
            balance -= amount
            # Stored when, and only if, this debit commits: in the same transaction.
            self.tell("account", message["to"], {"op": "credit", "amount": amount})
        elif op != "balance":
            raise ValueError(f"unknown op {op!r}")
        self.state["balance"] = balance
        return {"ok": True, "balance": balance, "node": self.bus.node}
