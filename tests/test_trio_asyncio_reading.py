"""
The same bridge behaviour when trio-asyncio reads the sockets (as it does for SSL connections).

pgbus normally reads each plain socket from the Trio task that waits for it; an SSL transport
decrypts in its own protocol, so there trio-asyncio keeps reading. This module turns the fast
path off and runs the bridge tests that exercise reading, ordering, back-pressure, transactions
and reconnection again.
"""

from __future__ import annotations

import pytest
from test_inbound import (
    test_block_overflow_holds_the_backlog_in_postgres_and_loses_nothing,
    test_drop_newest_keeps_the_oldest_and_marks_the_gap,
    test_order_within_a_transaction_and_across_commits,
    test_random_cancellation_leaves_listening_set_equal_to_registry,
)
from test_outbound import (
    test_outbound_republishes_after_its_connection_is_killed,
    test_rollback_never_delivers,
    test_transactional_publish_is_delivered_at_commit,
)
from test_reconnect import test_killed_listener_reconnects_and_marks_the_gap_in_place

from pgbus import _pg

__all__ = [
    "test_block_overflow_holds_the_backlog_in_postgres_and_loses_nothing",
    "test_drop_newest_keeps_the_oldest_and_marks_the_gap",
    "test_killed_listener_reconnects_and_marks_the_gap_in_place",
    "test_order_within_a_transaction_and_across_commits",
    "test_outbound_republishes_after_its_connection_is_killed",
    "test_random_cancellation_leaves_listening_set_equal_to_registry",
    "test_rollback_never_delivers",
    "test_the_fast_path_is_really_off_here",
    "test_transactional_publish_is_delivered_at_commit",
]


@pytest.fixture(autouse=True)
def trio_asyncio_reads_the_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection opened in these tests leaves its socket to trio-asyncio."""
    monkeypatch.setattr(_pg, "DRIVE_SOCKETS", False)


async def test_the_fast_path_is_really_off_here(pg_dsn: str) -> None:
    """In this module every pgbus connection is read by trio-asyncio, not driven by pgbus."""
    import pgbus

    async with pgbus.open_bus(pg_dsn) as bus:
        bus.add_channel("in", 1)
        await bus.bridge_in("mode_check", "in")
        listener = bus._listener
        assert listener is not None
        assert listener._connection is not None
        assert listener._connection.driven is False
