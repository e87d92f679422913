"""The exceptions pgbus raises. Each builds its message from structured attributes."""

from __future__ import annotations

from collections.abc import Callable

_NO_VALUE: object = object()


class PgbusError(Exception):
    """Base class of every error pgbus raises on purpose."""


class ConfigError(PgbusError):
    """A configuration value breaks a rule; the message names where, the rule and the value."""


class SettingError(ConfigError, ValueError):
    """
    One setting breaks its rule. The message is ``f"{key} {rule}"``; the structured parts let
    the configuration file name the same rule in its own form (``bus.toml: [table] key rule``)
    and the command line name the option (``--dsn rule``).
    """

    def __init__(self, key: str, rule: str, *, value: object = _NO_VALUE, prefix: str = "") -> None:
        self.key = key
        """The setting, as the Python API names it: ``dsn``, ``max_restarts``."""
        self.requirement = rule
        """The rule alone, ``must be an integer >= 0`` (with *value*), or the whole sentence."""
        self.value = value
        """The bad value, when the rule is about one value (else a private marker)."""
        self.rule = self.describe(repr)
        """The rest of the sentence, bad value included: ``must be an integer >= 0 (got -1).``"""
        super().__init__(f"{prefix}{key} {self.rule}")

    def describe(self, show: Callable[[object], str]) -> str:
        """The rule with the bad value written by *show* (the TOML loader writes ``true``)."""
        if self.value is _NO_VALUE:
            return self.requirement
        return f"{self.requirement} (got {show(self.value)})."


class ActorOptionsError(SettingError):
    """An actor's options that its class refuses: ``actor 'beat': options.to 'x' is ...``."""

    def __init__(self, actor: str, key: str, rule: str) -> None:
        self.actor = actor
        super().__init__(key, rule, prefix=f"actor {actor!r}: ")


class CapacityError(ConfigError, ValueError):
    """A channel capacity that is not 0, a positive integer or ``math.inf``."""

    def __init__(self, where: str, value: object) -> None:
        self.where = where
        self.value = value
        super().__init__(f"{where} must be 0, a positive integer or math.inf (got {value!r}).")


class UnknownChannelError(PgbusError, LookupError):
    """No channel of that name is registered on the bus."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no channel named {name!r} on this bus; add it with bus.add_channel().")


class DuplicateNameError(PgbusError, ValueError):
    """A channel or actor name that is already taken."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(f"{kind} {name!r} already exists on this bus.")


class UnknownActorError(PgbusError, LookupError):
    """No actor of that name runs on the bus."""

    def __init__(self, name: str, *, where: str = "on this bus") -> None:
        self.name = name
        self.where = where
        super().__init__(f"no actor named {name!r} {where}.")


class AskTimeoutError(PgbusError, TimeoutError):
    """``bus.ask()`` gave up waiting for the actor's reply."""

    def __init__(self, actor: str, timeout: float) -> None:
        self.actor = actor
        self.timeout = timeout
        super().__init__(f"actor {actor!r} did not reply within {timeout:g}s")


class ActorFailedError(PgbusError):
    """The actor raised while handling a request made with ``bus.ask()``."""

    def __init__(self, actor: str, error: BaseException) -> None:
        self.actor = actor
        self.error = error
        super().__init__(f"actor {actor!r} failed while handling the request: {error!r}")


class RestartIntensityError(PgbusError):
    """An actor failed more often than the supervisor's restart intensity allows."""

    def __init__(
        self, actor: str, restarts: int, within_seconds: float, last_failure: BaseException | None
    ) -> None:
        self.actor = actor
        self.restarts = restarts
        self.within_seconds = within_seconds
        self.last_failure = last_failure
        super().__init__(
            f"actor {actor!r} needed more than {restarts} restarts within {within_seconds:g}s; "
            f"the supervisor stopped its actors. Last failure: {last_failure!r}"
        )


class ChannelNameError(PgbusError, ValueError):
    """A PostgreSQL channel name that PostgreSQL would refuse or silently truncate."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"PostgreSQL channel name {name!r} {reason}")


class PayloadTooLargeError(PgbusError, ValueError):
    """An encoded payload over its limit: NOTIFY's (under 8000 bytes) or a durable channel's."""

    def __init__(self, channel: str, size: int, limit: int, *, durable: bool = False) -> None:
        self.channel = channel
        self.size = size
        self.limit = limit
        if durable:
            rule = (
                f"durable channels accept at most {limit} (open_bus durable_max_payload). "
                "Send a reference (a row id) instead of the data."
            )
        else:
            rule = (
                f"PostgreSQL accepts at most {limit}. Send a reference (a row id) instead of "
                "the data."
            )
        super().__init__(f"payload for channel {channel!r} is {size} bytes once encoded; {rule}")


class CodecError(PgbusError, ValueError):
    """A payload that the channel's codec cannot encode or decode."""

    def __init__(self, channel: str, codec: str, detail: str) -> None:
        self.channel = channel
        self.codec = codec
        self.detail = detail
        super().__init__(f"channel {channel!r} ({codec} codec): {detail}")


class DuplicateNotificationError(PgbusError, ValueError):
    """The same (channel, payload) twice in one transaction: PostgreSQL would merge them."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        super().__init__(
            f"this transaction already publishes the same payload to channel {channel!r}; "
            "PostgreSQL would deliver it only once. Make the payloads distinct (add an id)."
        )


class NoDatabaseError(PgbusError):
    """A bridge or transaction was asked of a bus opened without PostgreSQL."""

    def __init__(self) -> None:
        super().__init__(
            "this bus has no PostgreSQL: pass dsn=... or embedded=True to pgbus.open_bus()."
        )


class PoolExhaustedError(PgbusError):
    """Every connection of the bus's pool stayed busy for as long as a call may wait for one."""

    def __init__(self, where: str, size: int, waited: float) -> None:
        self.where = where
        self.size = size
        self.waited = waited
        super().__init__(
            f"the bus's {size} pooled connection(s) to PostgreSQL at {where} stayed busy for "
            f"{waited:g} s: raise pool_size ([postgres] pool_size, open_bus(pool_size=...)) or "
            "hold transactions for less time."
        )


class SessionNeededError(ConfigError):
    """What needs a session of its own was asked of a bus opened with pool_mode='transaction'."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"{what} needs a PostgreSQL session of its own (LISTEN, session advisory locks), "
            "which pool_mode = 'transaction' (a transaction-pooling proxy) cannot give: connect "
            "directly or through session pooling (PgBouncer pool_mode = session)."
        )


class DatabaseUnavailableError(PgbusError, ConnectionError):
    """PostgreSQL could not be reached; the message carries the redacted DSN and the cause."""

    def __init__(
        self, where: str, cause: str, *, fatal: bool = False, purpose: str | None = None
    ) -> None:
        self.where = where
        self.cause = cause
        self.fatal = fatal
        """True when retrying cannot help (bad password, unknown database or role)."""
        self.purpose = purpose
        """The connection's purpose (``listen``, ``publish orders``), when one was open."""
        if purpose is None:
            super().__init__(f"cannot reach PostgreSQL at {where}: {cause}")
        else:
            super().__init__(f"connection {purpose!r} to PostgreSQL at {where} failed: {cause}")


class DatabaseError(PgbusError):
    """PostgreSQL refused a statement (the connection itself is fine)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        self.sqlstate = sqlstate
        self.message = message
        super().__init__(f"PostgreSQL refused the statement ({sqlstate}): {message}")


def unwrap_group(error: BaseException, *, skip_cancelled: bool) -> BaseException:
    """
    The one error inside *error*: nested exception groups of one member unwrapped (with
    *skip_cancelled*, Trio's ``Cancelled`` members are left out first). A group that holds
    several errors is returned as it is; so is an error that is not a group.
    """
    while isinstance(error, BaseExceptionGroup):
        rest: BaseExceptionGroup[BaseException] | None = error
        if skip_cancelled:
            import trio  # the errors module stays importable without the runtime

            _, rest = error.split(trio.Cancelled)
        if rest is None or len(rest.exceptions) != 1:
            return error
        error = rest.exceptions[0]
    return error


class LeaseLostError(PgbusError):
    """A durable message this member no longer holds: its lease expired, or it was acknowledged."""

    def __init__(self, channel: str, group: str, message_id: int) -> None:
        self.channel = channel
        self.group = group
        self.message_id = message_id
        super().__init__(
            f"durable message {message_id} of {channel!r} is no longer held by this member of "
            f"group {group!r} (its lease expired and another member took it, or it was "
            "acknowledged already); nothing was committed."
        )


class MetricsUnavailableError(ConfigError):
    """The metrics server cannot start: the metrics extra is missing, or the address is taken."""


def _report_pgbus_as_module() -> None:
    """Every public error says ``pgbus.X`` in a traceback, even before ``pgbus.X`` is used."""
    pending: list[type[BaseException]] = [PgbusError]
    while pending:
        cls = pending.pop()
        if not cls.__name__.startswith("_"):
            cls.__module__ = "pgbus"
        pending.extend(cls.__subclasses__())


class ActorUnavailableError(PgbusError):
    """
    A remote actor that cannot answer: its node's session ended, or the request was lost.

    Raised by ``bus.ask()`` as soon as the cluster knows (within ``keepalive`` seconds), instead
    of waiting for the ask's whole timeout.
    """

    def __init__(
        self, actor: str, node: str | None, reason: str, *, while_handling: bool = True
    ) -> None:
        self.actor = actor
        self.node = node
        self.reason = reason
        where = f" on node {node!r}" if node is not None else ""
        during = " while handling the request" if while_handling else ""
        super().__init__(f"actor {actor!r}{where} became unavailable ({reason}){during}")


class MessageNotJSONError(PgbusError, TypeError):
    """A message (or a reply) for a remote actor that cannot be encoded as strict JSON."""

    def __init__(self, actor: str, what: str, detail: str) -> None:
        self.actor = actor
        self.what = what
        self.detail = detail
        super().__init__(
            f"{what} for remote actor {actor!r} is not JSON-encodable ({detail}); "
            "only JSON crosses between processes."
        )


class MessageTooLargeError(PgbusError, ValueError):
    """A request or reply for a remote actor too large for one NOTIFY."""

    def __init__(self, actor: str, what: str, size: int, limit: int) -> None:
        self.actor = actor
        self.what = what
        self.size = size
        self.limit = limit
        super().__init__(
            f"{what} for remote actor {actor!r} is {size} bytes once encoded; a NOTIFY carries "
            f"at most {limit}. Send a reference (a row id) instead of the data."
        )


class RemoteError(PgbusError):
    """
    What a remote actor's ``handle`` raised, as it crossed: its type's name and its message.

    Found as ``ActorFailedError.error`` when the failed actor runs on another node.
    """

    def __init__(self, type_name: str, message: str, node: str) -> None:
        self.type_name = type_name
        self.message = message
        self.node = node
        super().__init__(f"{type_name}: {message}" if message else type_name)

    def __repr__(self) -> str:
        return f"{self.type_name}({self.message!r}) on node {self.node!r}"


class NodeNameTakenError(PgbusError):
    """Another live node of the cluster already has this node's name."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        super().__init__(
            f"node name {name!r} is taken by a live node (its session is backend {pid}); "
            "give each process its own [node] name."
        )


_report_pgbus_as_module()
