"""A scripted agent: answers with given chunks, at a given pace, and fails or hangs on request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

import attrs

from gateway.agent import Agent, AgentRequest
from gateway.errors import AgentError


@attrs.frozen
class ScriptedAgentSettings:
    chunks: list[str] = attrs.field(factory=lambda: ["scripted ", "answer"])
    delay: float = 0.0
    #: after the chunks: "" ends normally, "agent" raises AgentError, "crash" raises RuntimeError,
    #: "hang" never ends (idle timeout)
    then: Literal["", "agent", "crash", "hang"] = ""
    #: answer with the question's text instead of the chunks (handy for ordering tests)
    echo: bool = False
    #: answer with the URLs of the question's attachments (what the agent was given)
    attachments: bool = False


class ScriptedAgent(Agent):
    title = "Scripted"
    description = "Test agent with a scripted answer."
    settings_class = ScriptedAgentSettings
    settings: ScriptedAgentSettings

    def __init__(self, settings: ScriptedAgentSettings) -> None:
        super().__init__(settings)
        #: every request received, in order (what the agent was given: text, history...)
        self.requests: list[AgentRequest] = []

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        if self.settings.attachments:
            chunks = [" ".join(a.url for a in request.attachments)]
        elif self.settings.echo:
            chunks = [request.text]
        else:
            chunks = self.settings.chunks
        for chunk in chunks:
            if self.settings.delay:
                await asyncio.sleep(self.settings.delay)
            yield chunk
        match self.settings.then:
            case "agent":
                raise AgentError("The scripted agent failed on purpose.")
            case "crash":
                raise RuntimeError("scripted crash")
            case "hang":
                await asyncio.Event().wait()
