"""
The keyed-actor example (examples/bank.toml, bank.py, bank_transfers.py), run as the README and
the tutorial tell a user to run it: ``pgbus run`` subprocesses, transfers from another process,
asks from the command line.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import TYPE_CHECKING, Any

import trio
from processes import ROOT, Pgbus, pgbus_env, run_to_completion, running

if TYPE_CHECKING:
    from conftest import PgHelper

WAIT = 60
BANK = "examples/bank.toml"


async def ask(key: str, message: dict[str, Any], dsn: str) -> dict[str, Any]:
    """``pgbus ask account --key KEY MESSAGE``: its reply (it must exit 0)."""
    result = await run_to_completion(
        "ask", "account", "--key", key, json.dumps(message), "--dsn", dsn, timeout=WAIT
    )
    assert result.returncode == 0, result.stderr.decode()
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


async def status(dsn: str) -> dict[str, Any]:
    result = await run_to_completion("status", "--json", "--dsn", dsn)
    assert result.returncode == 0, result.stderr.decode()
    [account] = [k for k in json.loads(result.stdout)["entities"] if k["kind"] == "account"]
    return account  # type: ignore[no-any-return]


async def node_of(bus: Pgbus) -> str:
    """The node name a ``pgbus run`` took (its first shards line, before "running", says it)."""
    line = await bus.expect("stderr", "entities account: node ", timeout=WAIT)
    return line.split("node ", 1)[1].split(" owns", 1)[0].strip("'")


async def test_the_bank_config_passes_check() -> None:
    """``pgbus check examples/bank.toml``: exit 0, the kind and its settings in the summary."""
    result = await run_to_completion("check", BANK, env=pgbus_env())
    assert result.returncode == 0, result.stderr.decode()
    assert "entities 'account': bank:Account, passivate after 60s, 3 attempts, concurrency 64" in (
        result.stdout.decode().splitlines()
    )


async def test_transfers_keep_the_total(pg: PgHelper) -> None:
    """bank_transfers.py against one node: 300 transfers, the total grows by the deposits only."""
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    async with running("run", BANK, env=env) as node:
        name = await node_of(node)
        await node.expect("stderr", "pgbus: running;", timeout=WAIT)
        with trio.fail_after(WAIT):
            result = await trio.run_process(
                [sys.executable, str(ROOT / "examples" / "bank_transfers.py")],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
                cwd=ROOT,
            )
        assert result.returncode == 0, result.stderr.decode()
        lines = result.stdout.decode().splitlines()
        assert lines[1:4] == [
            "deposited 100 into each of 4 accounts, in one transaction",
            "alice -> bob 1000000000000: refused",
            "stored 300 transfers in one statement",
        ]
        before = int(lines[0].removeprefix("total before: "))
        balances = [int(line.split(": ")[1]) for line in lines[4:8]]
        assert all(balance >= 0 for balance in balances)
        assert sum(balances) == before + 400
        assert lines[8] == f"total after: {before + 400} (expected {before + 400}: kept)"
        account = await status(pg.dsn)
        assert account["waiting"] == 0
        assert account["keys"] >= 4
        assert [(h["node"], h["shards"]) for h in account["hosts"]] == [(name, 256)]
        assert account["hosts"][0]["activations"] >= 4
        text = await run_to_completion("status", "--dsn", pg.dsn)
        [line] = [
            x for x in text.stdout.decode().splitlines() if x.startswith("entities 'account'")
        ]
        assert " 0 waiting, " in line, line
        assert line.endswith(
            f"; hosted by {name!r} {account['hosts'][0]['activations']} active / 256 shards"
        ), line
        assert await node.stop(signal.SIGINT, timeout=15) == 0
    await pg.wait_for_no_backends()


async def test_an_account_answers_from_the_other_node_after_a_kill(pg: PgHelper) -> None:
    """The tutorial: two nodes, asks from the CLI; kill -9 the key's node, the other answers."""
    env = pgbus_env(PGBUS_DSN=pg.dsn)
    async with running("run", BANK, env=env) as one, running("run", BANK, env=env) as two:
        names = {await node_of(one): one, await node_of(two): two}
        start = await ask("zoe", {"op": "balance"}, pg.dsn)
        deposited = await ask("zoe", {"op": "deposit", "amount": 25}, pg.dsn)
        assert deposited["balance"] == start["balance"] + 25
        answered_by = deposited["node"]
        assert answered_by in names
        hosts = (await status(pg.dsn))["hosts"]
        assert {h["node"] for h in hosts} == set(names)
        names[answered_by].process.kill()
        with trio.fail_after(WAIT):
            await names[answered_by].process.wait()
        after = await ask("zoe", {"op": "balance"}, pg.dsn)
        [survivor] = set(names) - {answered_by}
        assert (after["balance"], after["node"]) == (deposited["balance"], survivor)
        assert [h["node"] for h in (await status(pg.dsn))["hosts"]] == [survivor]
        assert await names[survivor].stop(signal.SIGINT, timeout=15) == 0
    await pg.wait_for_no_backends()
