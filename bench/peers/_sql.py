"""The statements every peer sends, in each driver's placeholder style."""

# One notification per call: what a user publishing one message at a time writes. pg_notify
# with bind parameters, never NOTIFY with a formatted channel name.
ASYNCPG_NOTIFY = "SELECT pg_notify($1, $2)"
PSYCOPG_NOTIFY = "SELECT pg_notify(%s, %s)"

# Payloads first..last as text from one statement: distinct, because PostgreSQL merges
# identical notifications within a transaction.
ASYNCPG_BURST = "SELECT pg_notify($1, i::text) FROM generate_series($2::int, $3::int) AS i"
PSYCOPG_BURST = "SELECT pg_notify(%s, i::text) FROM generate_series(%s::int, %s::int) AS i"


def burst_payloads(first: int, last: int) -> list[str]:
    """The payloads a burst statement sends for *first*..*last*, in order."""
    return [str(i) for i in range(first, last + 1)]
