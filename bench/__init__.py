"""
The pgbus benchmark: pgbus against four peer stacks, in one run, on one PostgreSQL.

Run it with ``python -m bench`` from the project root (``--help`` lists the options). Every
peer runs each workload in a fresh subprocess (``python -m bench.peers.<module> W1 ...``) that
prints one JSON line; the harness repeats, takes medians and prints ratios against the reference,
asyncpg on asyncio. See ``bench/README.md``.
"""
