"""
Transfers between the accounts of examples/bank.toml, from a process that hosts none of them.

Start ``python -m pgbus run examples/bank.toml`` first (in one terminal or several), then run
this with PGBUS_DSN set to the same server. It deposits 100 into each account in one
transaction, stores 300 random transfers in one statement, waits until every transfer and every
credit it caused is handled, and prints the balances: their total grew by the deposits exactly.
"""

import os
import random

import trio

import pgbus

ACCOUNTS = ("alice", "bob", "carol", "dave")
TRANSFERS = 300


async def balances(bus: pgbus.Bus) -> dict[str, int]:
    """Each balance once the messages stored so far, and the credits they sent, are handled."""
    # An ask is handled after every message stored for its key before it. The first round
    # therefore waits for the transfers (each commits its credit with its debit), the second
    # for those credits.
    for _ in range(2):
        replies = {
            key: await bus.entity("account", key).ask({"op": "balance"}, timeout=30)
            for key in ACCOUNTS
        }
    return {key: reply["balance"] for key, reply in replies.items()}


async def main(dsn: str) -> None:
    async with pgbus.open_bus(dsn) as bus:
        before = sum((await balances(bus)).values())
        print(f"total before: {before}")

        async with bus.transaction() as tx:  # stored when, and only if, this commits
            for key in ACCOUNTS:
                await tx.tell("account", key, {"op": "deposit", "amount": 100})
        print(f"deposited 100 into each of {len(ACCOUNTS)} accounts, in one transaction")

        too_much = {"op": "transfer", "to": "bob", "amount": 10**12}
        reply = await bus.entity("account", "alice").ask(too_much, timeout=30)
        print(f"alice -> bob {too_much['amount']}: {'done' if reply['ok'] else 'refused'}")

        pick = random.Random(42)
        transfers = []
        for _ in range(TRANSFERS):
            source, to = pick.sample(ACCOUNTS, 2)
            transfers.append((source, {"op": "transfer", "to": to, "amount": pick.randint(1, 60)}))
        stored = await bus.tell_many("account", transfers)
        print(f"stored {stored} transfers in one statement")

        after = await balances(bus)
        for key, balance in after.items():
            print(f"{key}: {balance}")
        expected = before + 100 * len(ACCOUNTS)
        verdict = "kept" if sum(after.values()) == expected else "NOT KEPT"
        print(f"total after: {sum(after.values())} (expected {expected}: {verdict})")


trio.run(main, os.environ["PGBUS_DSN"])
