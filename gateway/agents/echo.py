"""The echo agent: repeats the message, a word at a time, so streaming is visible without an LLM."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import attrs

from gateway.agent import Agent, AgentRequest

__all__ = ["EchoAgent", "EchoAgentSettings"]


@attrs.frozen
class EchoAgentSettings:
    delay: float = attrs.field(
        default=0.05,
        validator=attrs.validators.ge(0),
        metadata={"help": "seconds to wait before each chunk (simulates a slow agent)"},
    )
    prefix: str = attrs.field(default="", metadata={"help": "text put before the echoed message"})


class EchoAgent(Agent):
    title = "Echo"
    description = "Repeats the message word by word; for trying the gateway and for tests."
    settings_class = EchoAgentSettings

    settings: EchoAgentSettings

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        text = self.settings.prefix + request.text
        # Keep the whitespace with each word so the chunks join back to exactly the input.
        for chunk in re.findall(r"\S+\s*|\s+", text) or [""]:
            if self.settings.delay:
                await asyncio.sleep(self.settings.delay)
            yield chunk
