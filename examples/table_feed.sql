-- The table examples/table_feed.toml watches (run by its "schema" actor; harmless to re-run).
CREATE TABLE IF NOT EXISTS orders (
    id serial PRIMARY KEY,
    item text NOT NULL,
    quantity integer NOT NULL DEFAULT 1
);
