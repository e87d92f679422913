"""
pgbus: a Trio actor message bus on PostgreSQL LISTEN/NOTIFY.

Public names are loaded on first use, so that ``pgbus check`` never imports the driver and
``python -m pgbus`` handles signals from its first moment; each reports ``pgbus`` as its module.
"""

from __future__ import annotations

import sys as _sys

from . import _signals

if _signals.started_as_the_command(_sys):  # before any other import: no signal is lost or fatal
    _signals.remember_early_signals()

import importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# A library logs, the application decides where to: nothing is printed unless it configures
# logging (``pgbus run`` does).
_logging.getLogger("pgbus").addHandler(_logging.NullHandler())

_EXPORTS: dict[str, str] = {  # public name -> the private module defining it
    "serve_metrics": "_metrics",
    "MetricsUnavailableError": "_errors",
    "Actor": "_actor",
    "Bridge": "_bridge",
    "BridgeStatistics": "_bridge",
    "Bus": "_bus",
    "BusStatistics": "_bus",
    "Transaction": "_bus",
    "EntityRef": "_bus",
    "Entity": "_entities",
    "EntityKeyError": "_entities",
    "KindStatistics": "_entities",
    "UnknownEntityKindError": "_entities",
    "open_bus": "_bus",
    "Channel": "_channel",
    "ChannelStatistics": "_channel",
    "ClusterStatistics": "_cluster",
    "ClusterStatus": "_cluster",
    "NodeInfo": "_cluster",
    "SingletonStatus": "_cluster",
    "MAX_CHANNEL_NAME_BYTES": "_codec",
    "MAX_PAYLOAD_BYTES": "_codec",
    "validate_channel_name": "_codec",
    "ActorFailedError": "_errors",
    "ActorUnavailableError": "_errors",
    "MessageNotJSONError": "_errors",
    "MessageTooLargeError": "_errors",
    "NodeNameTakenError": "_errors",
    "RemoteError": "_errors",
    "AskTimeoutError": "_errors",
    "CapacityError": "_errors",
    "ChannelNameError": "_errors",
    "CodecError": "_errors",
    "ConfigError": "_errors",
    "DatabaseError": "_errors",
    "DatabaseUnavailableError": "_errors",
    "DuplicateNameError": "_errors",
    "DuplicateNotificationError": "_errors",
    "NoDatabaseError": "_errors",
    "SessionNeededError": "_errors",
    "PayloadTooLargeError": "_errors",
    "PgbusError": "_errors",
    "PoolExhaustedError": "_errors",
    "RestartIntensityError": "_errors",
    "UnknownActorError": "_errors",
    "UnknownChannelError": "_errors",
    "Gap": "_inbound",
    "DurableMessage": "_durable._rules",
    "MAX_DURABLE_PAYLOAD_BYTES": "_durable._rules",
    "GroupStatus": "_durable._admin",
    "SchemaError": "_durable._schema",
    "LeaseLostError": "_errors",
    "Notification": "_inbound",
    "ActorStatistics": "_supervisor",
    "Supervision": "_supervisor",
}

if TYPE_CHECKING:
    from ._actor import Actor as Actor
    from ._bridge import Bridge as Bridge
    from ._bridge import BridgeStatistics as BridgeStatistics
    from ._bus import Bus as Bus
    from ._bus import BusStatistics as BusStatistics
    from ._bus import EntityRef as EntityRef
    from ._bus import Transaction as Transaction
    from ._bus import open_bus as open_bus
    from ._channel import Channel as Channel
    from ._channel import ChannelStatistics as ChannelStatistics
    from ._cluster import ClusterStatistics as ClusterStatistics
    from ._cluster import ClusterStatus as ClusterStatus
    from ._cluster import NodeInfo as NodeInfo
    from ._cluster import SingletonStatus as SingletonStatus
    from ._codec import MAX_CHANNEL_NAME_BYTES as MAX_CHANNEL_NAME_BYTES
    from ._codec import MAX_PAYLOAD_BYTES as MAX_PAYLOAD_BYTES
    from ._codec import validate_channel_name as validate_channel_name
    from ._durable._admin import GroupStatus as GroupStatus
    from ._durable._rules import MAX_DURABLE_PAYLOAD_BYTES as MAX_DURABLE_PAYLOAD_BYTES
    from ._durable._rules import DurableMessage as DurableMessage
    from ._durable._schema import SchemaError as SchemaError
    from ._entities import Entity as Entity
    from ._entities import EntityKeyError as EntityKeyError
    from ._entities import KindStatistics as KindStatistics
    from ._entities import UnknownEntityKindError as UnknownEntityKindError
    from ._errors import ActorFailedError as ActorFailedError
    from ._errors import ActorUnavailableError as ActorUnavailableError
    from ._errors import AskTimeoutError as AskTimeoutError
    from ._errors import CapacityError as CapacityError
    from ._errors import ChannelNameError as ChannelNameError
    from ._errors import CodecError as CodecError
    from ._errors import ConfigError as ConfigError
    from ._errors import DatabaseError as DatabaseError
    from ._errors import DatabaseUnavailableError as DatabaseUnavailableError
    from ._errors import DuplicateNameError as DuplicateNameError
    from ._errors import DuplicateNotificationError as DuplicateNotificationError
    from ._errors import LeaseLostError as LeaseLostError
    from ._errors import MessageNotJSONError as MessageNotJSONError
    from ._errors import MessageTooLargeError as MessageTooLargeError
    from ._errors import MetricsUnavailableError as MetricsUnavailableError
    from ._errors import NoDatabaseError as NoDatabaseError
    from ._errors import NodeNameTakenError as NodeNameTakenError
    from ._errors import PayloadTooLargeError as PayloadTooLargeError
    from ._errors import PgbusError as PgbusError
    from ._errors import PoolExhaustedError as PoolExhaustedError
    from ._errors import RemoteError as RemoteError
    from ._errors import RestartIntensityError as RestartIntensityError
    from ._errors import SessionNeededError as SessionNeededError
    from ._errors import UnknownActorError as UnknownActorError
    from ._errors import UnknownChannelError as UnknownChannelError
    from ._inbound import Gap as Gap
    from ._inbound import Notification as Notification
    from ._metrics import serve_metrics as serve_metrics
    from ._supervisor import ActorStatistics as ActorStatistics
    from ._supervisor import Supervision as Supervision

__all__ = [
    "MAX_CHANNEL_NAME_BYTES",
    "MAX_DURABLE_PAYLOAD_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Actor",
    "ActorFailedError",
    "ActorStatistics",
    "ActorUnavailableError",
    "AskTimeoutError",
    "Bridge",
    "BridgeStatistics",
    "Bus",
    "BusStatistics",
    "CapacityError",
    "Channel",
    "ChannelNameError",
    "ChannelStatistics",
    "ClusterStatistics",
    "ClusterStatus",
    "CodecError",
    "ConfigError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DuplicateNameError",
    "DuplicateNotificationError",
    "DurableMessage",
    "Entity",
    "EntityKeyError",
    "EntityRef",
    "Gap",
    "GroupStatus",
    "KindStatistics",
    "LeaseLostError",
    "MessageNotJSONError",
    "MessageTooLargeError",
    "MetricsUnavailableError",
    "NoDatabaseError",
    "NodeInfo",
    "NodeNameTakenError",
    "Notification",
    "PayloadTooLargeError",
    "PgbusError",
    "PoolExhaustedError",
    "RemoteError",
    "RestartIntensityError",
    "SchemaError",
    "SessionNeededError",
    "SingletonStatus",
    "Supervision",
    "Transaction",
    "UnknownActorError",
    "UnknownChannelError",
    "UnknownEntityKindError",
    "open_bus",
    "serve_metrics",
    "validate_channel_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pgbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if isinstance(value, type) or callable(value):
        value.__module__ = __name__  # tracebacks say pgbus.PayloadTooLargeError, as trio does
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
