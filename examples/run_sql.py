"""
An actor that runs an SQL file once, when it starts: the schema the next actors need.

Actors start in file order, each after the previous one's ``on_start``, so this one placed
first in a config (see ``table_feed.toml``) creates tables before anything uses them.
"""

from pathlib import Path

import pgbus


class RunSql(pgbus.Actor):
    """Run the statements in *file* (a path relative to this directory, or absolute)."""

    def __init__(self, file: str) -> None:
        self.path = Path(__file__).parent / file

    async def on_start(self) -> None:
        sql = self.path.read_text(encoding="utf-8")
        async with self.bus.transaction() as tx:
            await tx.execute(sql)
