"""
A TCP proxy for fault tests: forwards to the test's PostgreSQL, and can stop forwarding.

`stall()` makes every connection open now stop answering, in both directions, while its sockets
stay open (no FIN, no RST): a half-open path, as a stalled proxy or a dead peer makes. With
``new=True`` connections made afterwards are accepted and stalled too (a proxy that hangs
everything); otherwise they are forwarded (only existing paths are broken).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio


def upstream_of(dsn: str) -> tuple[str, int, bool]:
    """Where *dsn*'s server listens: ``(host or socket path, port, is_unix)``."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "localhost"
    port = int(query.get("port") or parts.port or 5432)
    if host.startswith("/"):
        return os.path.join(host, f".s.PGSQL.{port}"), port, True
    return host, port, False


def via(dsn: str, port: int) -> str:
    """*dsn* with its server replaced by ``127.0.0.1:port``."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
    user = parts.username or "postgres"
    netloc = f"{user}@127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


class Proxy:
    def __init__(self, dsn: str) -> None:
        self._upstream = upstream_of(dsn)
        self._dsn = dsn
        self.port = 0
        self._paths: list[trio.CancelScope] = []
        self._stall_new = False
        self.accepted = 0
        self.refuse_new = False
        """Close each new connection at once, before a word (a server that refuses it)."""
        self.drop_notifications = False
        """Forward everything but the server's NotificationResponse messages, as a
        transaction-pooling proxy does for a LISTEN that has no session of its own."""

    @property
    def dsn(self) -> str:
        """A DSN for the same database, through this proxy."""
        return via(self._dsn, self.port)

    def stall(self, *, new: bool = False) -> None:
        """Stop forwarding on every open connection (and on new ones too, with *new*)."""
        self._stall_new = new
        for path in self._paths:
            path.cancel()

    def resume_new(self) -> None:
        """Forward connections made from now on again (stalled ones stay stalled)."""
        self._stall_new = False

    async def _open_upstream(self) -> trio.abc.Stream:
        where, port, unix = self._upstream
        if unix:
            return await trio.open_unix_socket(where)
        return await trio.open_tcp_stream(where, port)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            if self.refuse_new:
                return
            if self._stall_new:
                await trio.sleep_forever()
            server = await self._open_upstream()
            async with server:
                with trio.CancelScope() as path:
                    self._paths.append(path)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                        replies = _without_notifications if self.drop_notifications else _pump
                        nursery.start_soon(replies, server, client, nursery.cancel_scope)
                if path.cancelled_caught:
                    # Stalled: keep both sockets open and silent until the test ends.
                    await trio.sleep_forever()


async def _pump(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, both: trio.CancelScope
) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    both.cancel()  # one side hung up: close the other


@asynccontextmanager
async def open_proxy(dsn: str) -> AsyncIterator[Proxy]:
    """A running `Proxy` to *dsn*'s server; everything it holds is closed on exit."""
    proxy = Proxy(dsn)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()


async def _without_notifications(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, both: trio.CancelScope
) -> None:
    """Server to client, message by message, leaving out NotificationResponse ('A')."""
    buffer = b""
    first = True
    try:
        while data := await source.receive_some(65536):
            buffer += data
            if first and buffer[:1] in (b"N", b"S"):  # the one-byte answer to an SSLRequest
                await sink.send_all(buffer[:1])
                buffer = buffer[1:]
            first = False
            out = bytearray()
            while len(buffer) >= 5:
                length = int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 1 + length:
                    break
                message, buffer = buffer[: 1 + length], buffer[1 + length :]
                if message[:1] != b"A":
                    out += message
            if out:
                await sink.send_all(bytes(out))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    both.cancel()
