"""pgbus: a Trio actor message bus on PostgreSQL LISTEN/NOTIFY."""

from ._actor import Actor as Actor
from ._bridge import Bridge as Bridge
from ._bridge import BridgeStatistics as BridgeStatistics
from ._bus import Bus as Bus
from ._bus import BusStatistics as BusStatistics
from ._bus import Transaction as Transaction
from ._bus import open_bus as open_bus
from ._channel import Channel as Channel
from ._channel import ChannelStatistics as ChannelStatistics
from ._codec import MAX_CHANNEL_NAME_BYTES as MAX_CHANNEL_NAME_BYTES
from ._codec import MAX_PAYLOAD_BYTES as MAX_PAYLOAD_BYTES
from ._codec import validate_channel_name as validate_channel_name
from ._durable import GroupStatus as GroupStatus
from ._durable import SchemaError as SchemaError
from ._durable._rules import MAX_DURABLE_PAYLOAD_BYTES as MAX_DURABLE_PAYLOAD_BYTES
from ._durable._rules import DurableMessage as DurableMessage
from ._errors import ActorFailedError as ActorFailedError
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
from ._errors import NoDatabaseError as NoDatabaseError
from ._errors import PayloadTooLargeError as PayloadTooLargeError
from ._errors import PgbusError as PgbusError
from ._errors import RestartIntensityError as RestartIntensityError
from ._errors import UnknownActorError as UnknownActorError
from ._errors import UnknownChannelError as UnknownChannelError
from ._inbound import Gap as Gap
from ._inbound import Notification as Notification
from ._supervisor import ActorStatistics as ActorStatistics
from ._supervisor import Supervision as Supervision

__version__ = "0.1.0"

__all__ = [
    "MAX_CHANNEL_NAME_BYTES",
    "MAX_DURABLE_PAYLOAD_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Actor",
    "ActorFailedError",
    "ActorStatistics",
    "AskTimeoutError",
    "Bridge",
    "BridgeStatistics",
    "Bus",
    "BusStatistics",
    "CapacityError",
    "Channel",
    "ChannelNameError",
    "ChannelStatistics",
    "CodecError",
    "ConfigError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "DuplicateNameError",
    "DuplicateNotificationError",
    "DurableMessage",
    "Gap",
    "GroupStatus",
    "LeaseLostError",
    "NoDatabaseError",
    "Notification",
    "PayloadTooLargeError",
    "PgbusError",
    "RestartIntensityError",
    "SchemaError",
    "Supervision",
    "Transaction",
    "UnknownActorError",
    "UnknownChannelError",
    "open_bus",
    "validate_channel_name",
]
