"""asyncpg on uvloop: the reference's code, unchanged, on uvloop's event loop."""

from __future__ import annotations

from collections.abc import Sequence

import uvloop

from . import asyncpg_asyncio


def main(argv: Sequence[str] | None = None) -> int:
    """Run one workload of `bench.peers.asyncpg_asyncio` on a uvloop event loop."""
    return asyncpg_asyncio.main(argv, peer="asyncpg_uvloop", loop_factory=uvloop.new_event_loop)


if __name__ == "__main__":
    raise SystemExit(main())
