"""imgateway: connect enterprise IM robots to AI agents.

The public API for plugin authors is re-exported here; everything else is the core's own business.
"""

from gateway.agent import Agent, AgentRequest, HistoryTurn, call_in_thread, iterate_in_thread
from gateway.driver import Capabilities, Driver, DriverContext, ReplyChannel
from gateway.errors import (
    AuthenticationError,
    ConnectionLost,
    DriverConfigError,
    DriverError,
    GatewayError,
    RateLimited,
    RetryableError,
    ShuttingDown,
)
from gateway.models import (
    Attachment,
    ConversationKind,
    FeedbackEvent,
    Incoming,
    Mention,
    Outcome,
    Reply,
)
from gateway.secrets import Secret

__all__ = [
    "Agent",
    "AgentRequest",
    "Attachment",
    "AuthenticationError",
    "Capabilities",
    "ConnectionLost",
    "ConversationKind",
    "Driver",
    "DriverConfigError",
    "DriverContext",
    "DriverError",
    "FeedbackEvent",
    "GatewayError",
    "HistoryTurn",
    "Incoming",
    "Mention",
    "Outcome",
    "RateLimited",
    "Reply",
    "ReplyChannel",
    "RetryableError",
    "Secret",
    "ShuttingDown",
    "call_in_thread",
    "iterate_in_thread",
]
