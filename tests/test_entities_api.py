"""
Keyed actors as a user meets them outside Python code: the ``[entities.KIND]`` table, the
command line (``tell``/``ask --key``, ``status``) against a real ``pgbus run``, and traces.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from processes import ROOT, pgbus_env, run_to_completion, running

import pgbus
from pgbus._config import ConfigError, parse_config
from pgbus._entities._entity import shard_of

if TYPE_CHECKING:
    from conftest import PgHelper

TESTS = Path(__file__).parent
NODE = "[node]\n"
BANK = '[entities.bank]\nclass = "fixtures_actors.bank:Account"\n'


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_config(textwrap.dedent(text), "bus.toml", base_dir=TESTS)


def test_an_entities_table_is_read_with_its_defaults_and_summarised() -> None:
    config = parse(NODE + BANK + "passivate_after = 5\nconcurrency = 8\n")
    (entity,) = config.entities
    assert entity.kind == "bank"
    spec = entity.spec
    assert spec.cls.__name__ == "Account"
    assert (spec.passivate_after, spec.max_attempts, spec.retry_after) == (5.0, 5, 1.0)
    assert (spec.concurrency, spec.batch) == (8, 1000)
    assert config.needs_database
    assert (
        "entities 'bank': fixtures_actors.bank:Account, passivate after 5s, 5 attempts, "
        "concurrency 8" in config.summary()
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            BANK,
            "bus.toml: entities needs a [node] table: keyed actors are hosted by nodes of the "
            "cluster (add [node], with or without a name).",
        ),
        (
            NODE + BANK.replace("bank]", "Bank]"),
            "bus.toml: [entities.Bank] the kind in [entities.KIND] must be 1-64 characters of a-z, "
            "0-9, '_', '.', '-', starting with a letter (got 'Bank').",
        ),
        (
            NODE + BANK.replace("bank]", "banks]"),
            "bus.toml: [entities.banks] class 'fixtures_actors.bank:Account' has kind 'bank', "
            "not 'banks': they must match.",
        ),
        (
            NODE + BANK.replace("Account", "NotAnEntity"),
            "bus.toml: [entities.bank] class 'fixtures_actors.bank:NotAnEntity' is not a subclass "
            "of pgbus.Entity (got class fixtures_actors.bank.NotAnEntity).",
        ),
        (
            NODE + BANK + "passivate_after = 0\n",
            "bus.toml: [entities.bank] passivate_after must be a number of seconds greater than 0 "
            "(got 0).",
        ),
        (
            NODE + BANK + "retry_after = -1\n",
            "bus.toml: [entities.bank] retry_after must be a number of seconds at least 0 "
            "(got -1).",
        ),
        (
            NODE + BANK + "concurrency = 0\n",
            "bus.toml: [entities.bank] concurrency must be an integer of at least 1 (got 0).",
        ),
        (
            NODE + BANK + "max_attempt = 3\n",
            "bus.toml: [entities.bank] unknown key 'max_attempt'; did you mean 'max_attempts'?",
        ),
    ],
)
def test_a_broken_entities_table_is_one_line_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse(text)


def _config(tmp_path: Path, dsn: str, node: str) -> str:
    path = tmp_path / f"{node}.toml"
    path.write_text(
        f'[postgres]\ndsn = "{dsn}"\nkeepalive = 2\n[node]\nname = "{node}"\n{BANK}'
        "max_attempts = 2\nretry_after = 0\n"
    )
    return str(path)


async def test_the_command_line_tells_and_asks_a_keyed_actor_of_a_running_node(
    pg_dsn: str, tmp_path: Path
) -> None:
    """``pgbus run`` hosts the kind; ``ask``/``tell --key`` reach it; ``status`` shows it."""
    node = f"bank-{uuid.uuid4().hex[:6]}"
    key = uuid.uuid4().hex
    env = pgbus_env(PYTHONPATH=str(TESTS))
    async with running("run", _config(tmp_path, pg_dsn, node), env=env) as bus:
        await bus.expect("stderr", "running;")
        told = await run_to_completion(
            "tell", "bank", "--key", key, '{"amount": 5}', "--dsn", pg_dsn, env=env
        )
        assert told.returncode == 0, told.stderr
        assert f"told bank/{key}" in told.stderr.decode()
        asked = await run_to_completion(
            "ask", "bank", "--key", key, '{"amount": 2}', "--dsn", pg_dsn, env=env
        )
        assert (asked.returncode, asked.stdout.decode()) == (0, "7\n"), asked.stderr
        failed = await run_to_completion(
            "ask", "bank", "--key", key, '{"fail": true}', "--dsn", pg_dsn, env=env
        )
        assert failed.returncode == 1
        assert (
            f"actor 'bank/{key}' failed while handling the request: "
            f"ValueError('refused on purpose') on node '{node}'"
        ) in failed.stderr.decode()
        assert failed.stderr.decode().count("\n") == 1, failed.stderr
        status = await run_to_completion("status", "--dsn", pg_dsn, env=env)
        lines = status.stdout.decode().splitlines()
        line = next(x for x in lines if x.startswith("entities 'bank'"))
        assert re.match(
            rf"entities 'bank': \d+ keys, 0 waiting, \d+ dead; hosted by '{node}' "
            r"\d+ active / 256 shards$",
            line,
        ), line
        as_json = await run_to_completion("status", "--dsn", pg_dsn, "--json", env=env)
        (kind,) = [k for k in json.loads(as_json.stdout)["entities"] if k["kind"] == "bank"]
        assert [h["node"] for h in kind["hosts"]] == [node]
        assert kind["hosts"][0]["shards"] == 256


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("nosuchkind", "--key", "1", "{}"),
            "pgbus: error: no node has ever hosted entity kind 'nosuchkind': host it first "
            "([entities.nosuchkind] in a node's config, or bus.host(...)), or check the name.",
        ),
        (
            ("bank", "--key", "", "{}"),
            "pgbus: error: entity 'bank': a key must be 1-256 characters without NUL "
            "(got 0 characters: '').",
        ),
        (
            ("bank", "--key", "k" * 300, "{}"),
            "pgbus: error: entity 'bank': a key must be 1-256 characters without NUL "
            f"(got 300 characters: {'k' * 40!r}).",
        ),
        (
            ("Bad Kind", "--key", "1", "{}"),
            "pgbus: error: entity kind must be 1-64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter (got 'Bad Kind').",
        ),
    ],
)
# (A kind or a key that cannot be one is a usage error, exit status 2; an unknown kind is 1.)
async def test_bad_addresses_are_one_line_and_store_nothing(
    pg_dsn: str, pg: PgHelper, args: tuple[str, ...], message: str
) -> None:
    before = await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail")
    result = await run_to_completion("tell", *args, "--dsn", pg_dsn)
    assert result.returncode == (1 if args[0] == "nosuchkind" else 2)
    assert result.stderr.decode() == message + "\n"
    assert await pg.fetchval("SELECT count(*) FROM pgbus.entity_mail") == before


TRACED = """
import json, sys, trio, pgbus
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
sys.path.insert(0, sys.argv[2])
from fixtures_actors.bank import Account

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

async def main():
    async with pgbus.open_bus(sys.argv[1], node="traced-bank", keepalive=2) as bus:
        await bus.host(Account)
        forward = sys.argv[4]
        await bus.entity("bank", sys.argv[3]).ask({"amount": 1, "forward": forward}, timeout=20)
        with trio.fail_after(20):
            while await bus.entity("bank", forward).ask({"amount": 0}, timeout=20) != 1:
                pass
    for span in exporter.get_finished_spans():
        print(json.dumps({
            "name": span.name, "trace": span.context.trace_id, "span": span.context.span_id,
            "parent": span.parent.span_id if span.parent else None,
        }))
trio.run(main)
"""


async def test_a_trace_follows_an_ask_through_the_mailbox_and_a_handler_s_tell(
    pg_dsn: str,
) -> None:
    """``ask bank`` -> ``handle bank`` (its child, through the stored message) -> the handler's
    tell -> ``handle bank`` of the other key (a child of the first handle span)."""
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    result = await trio.run_process(
        [sys.executable, "-c", TRACED, pg_dsn, str(TESTS), first, second],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    spans = [json.loads(line) for line in result.stdout.decode().splitlines()]
    by_id = {s["span"]: s for s in spans}
    (ask,) = [s for s in spans if s["name"] == "ask bank"][:1]
    handles = [s for s in spans if s["name"] == "handle bank" and s["trace"] == ask["trace"]]
    assert handles, spans
    first_handle = next(s for s in handles if s["parent"] == ask["span"])
    forwarded = [s for s in handles if s["parent"] == first_handle["span"]]
    assert forwarded, spans
    assert all(by_id.get(s["parent"]) is not None for s in handles)


async def _shards(bus: pgbus.Bus, kind: str) -> int:
    return next((k.shards for k in bus.statistics().entities if k.kind == kind), 0)


async def test_a_key_that_leaves_and_comes_back_is_loaded_again(pg_dsn: str) -> None:
    """
    A node whose key moved away and came back handles its next message from the committed
    state, not from the activation it had before (which would lose the other node's update).
    """
    kind = f"count-{uuid.uuid4().hex[:8]}"

    class Count(pgbus.Entity):
        async def handle(self, message: object) -> object:
            self.state["n"] = self.state.get("n", 0) + 1
            return [self.state["n"], self.bus.node]

    Count.kind = kind
    keys = [f"k{i}" for i in range(40)]
    async with pgbus.open_bus(pg_dsn, node=f"a-{kind}", keepalive=1) as a:
        await a.host(Count, passivate_after=3600)
        for key in keys:
            assert (await a.entity(kind, key).ask(None, timeout=20))[0] == 1
        async with pgbus.open_bus(pg_dsn, node=f"b-{kind}", keepalive=1) as b:
            await b.host(Count, passivate_after=3600)
            with trio.fail_after(20):
                while not await _shards(b, kind):  # noqa: ASYNC110 (placement has no event)
                    await trio.sleep(0.05)
            moved = [k for k in keys if shard_of(k) in b._entities.kinds[kind].owned]  # type: ignore[union-attr]
            assert moved
            for key in moved:
                assert await b.entity(kind, key).ask(None, timeout=20) == [2, f"b-{kind}"]
        # b has left: its shards are a's again, and a has not handled anything meanwhile.
        for key in moved:
            assert await a.entity(kind, key).ask(None, timeout=20) == [3, f"a-{kind}"]
