"""The echo driver: a local chat for trying the gateway and for tests, with no account needed.

It is also the reference for plugin authors: a complete driver in a few small modules.
"""

from gateway_echo.driver import EchoDriver, EchoSettings

__all__ = ["EchoDriver", "EchoSettings"]
