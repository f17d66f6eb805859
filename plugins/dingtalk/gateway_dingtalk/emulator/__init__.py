"""A local, offline DingTalk: Stream gateway, OpenAPI and session webhooks on loopback, for tests.

Point a client at ``emu.url`` (``DINGTALK_OPENAPI_ENDPOINT`` for the official SDK): it opens a
Stream connection there, receives the robot messages and card clicks the test pushes, and calls the
OpenAPI and the ``sessionWebhook`` of each message, which point back at the emulator.  The test then
reads what a DingTalk user would see (``emu.cards``, ``emu.sent``) and what the client did
(``emu.acks``, ``emu.calls``, ``emu.violations``)::

    async with DingTalkEmulator(templates={"tpl.schema": {"content"}}) as emu:
        ...  # start the client with endpoint emu.url, clientId "ding-app-id", secret "ding-app-secret"
        sent = await emu.send_message(text="hello")
        await emu.wait_acked(sent.msg_id)

For pytest, ``pytest_plugins = ["gateway_dingtalk.emulator.fixture"]`` (in the root conftest.py)
gives the ``dingtalk_emulator`` and ``dingtalk_emulator_factory`` fixtures.

**Faithful** (built from ``shared/research/dingtalk-protocol.md``, checked against the official
Python SDK 0.24.3 in ``tests/dingtalk/test_emulator_vs_sdk.py``):

* ``connections/open``: credentials (401 ``authFailed``), required subscriptions, single-use
  tickets valid 90 s, JSON only when ``Accept: application/json`` (else XML, as the real gateway);
  the websocket handshake rejects a bad, used or expired ticket with HTTP 401; ``connectionId`` is
  the ticket.
* Frames: ``specVersion``/``type``/``headers``/``data`` with ``headers.time`` a string of epoch ms
  and ``data`` a JSON string; ``headers.appId`` is a unified app id (a UUID), not the clientId;
  SYSTEM ``ping`` with ``opaque`` (echo verified), SYSTEM ``disconnect`` (no appId/connectionId,
  TCP closed 10 s later); CALLBACK/EVENT only for subscribed topics; websocket Pings answered.
* Acks: matched by ``messageId`` on the connection that delivered the frame; elsewhere they are
  ``misrouted`` and do not count.  Unacked robot messages and events are redelivered with the same
  ``data`` (same ``msgId``) and, by default, a new frame id.  One push goes to one connection
  (random by default; "newest wins" and "reject the second" as options).
* Robot message payloads (§2): every documented field and type, group text with a leading space,
  ``isInAtList``/``atUsers``/``conversationTitle`` in groups only, group messages delivered only
  when they @ the bot, audio/video/file only in 1:1 chats, ``sessionWebhook`` expiring
  ``sessionWebhookExpiredTime`` (90 min by default).
* OpenAPI: the ``{"code","message","requestid"}`` envelope; token flow (same token within its TTL,
  400 ``InvalidAuthentication`` for unknown/expired tokens, 400
  ``AuthenticationFailed.MissingParameter`` without the header); card validation (string-only
  ``cardParamMap``, template must exist, unique ``outTrackId``, ``openSpaceId`` formats with their
  deliver models and robot code); streaming (``guid`` idempotency, ``isFull`` required for markdown,
  ``isFinalize``/``isError`` states); card-click callbacks whose ack ``response`` updates the card;
  per-app, per-API QPS limit answered with 403 ``Forbidden.AccessDenied.QpsLimitForAppkeyAndApi``.

**Simplified or invented** (the docs do not say):

* Error codes DingTalk does not document are the emulator's own, in DingTalk's style (e.g.
  ``param.cardParamMapValueNotString``, ``param.cardParamMapKeyNotInTemplate``,
  ``param.stream.keyNotExist``, ``param.stream.cardFinished``, ``Forbidden.ConcurrencyProtection``);
  a driver should branch on HTTP status and documented codes only.  Session webhook errors use
  ``errcode`` 300001 (unknown/expired session), 400105 (msgtype), 40035 (missing field).
* Every card variable is treated as a markdown variable (``isFull`` must be true), unknown
  ``cardParamMap`` keys are rejected, and a card that finished or failed refuses further streaming;
  the real platform may be more lenient on the last two (they are driver bugs either way).
* Only ``IM_GROUP`` and ``IM_ROBOT`` spaces; a group/user is known once a message came from it (or
  via :meth:`DingTalkEmulator.add_conversation` / ``add_user``).  No permissions/scopes, no monthly
  quotas, no message-length limits except the optional ``max_stream_content_bytes`` and
  ``max_param_value_bytes``; ``/v1.0/card/instances`` answers ``{"success", "result"}`` shapes.
* The retry schedule of the real server is undocumented: here ``ack_timeout`` (10 s) and
  ``max_redeliveries`` (2), card clicks are never redelivered; ``SYSTEM/ping`` is sent only if
  ``ping_interval`` is set; the legacy card API stores cards but never calls back (as documented,
  it has no Stream callbacks).
"""

from gateway_dingtalk.emulator._payloads import BOT_TOPIC, CARD_TOPIC
from gateway_dingtalk.emulator._records import (
    AckRecord,
    CallRecord,
    CardClick,
    CardState,
    CardUpdate,
    ConcurrentCardUpdate,
    Conversation,
    Distribution,
    EmulatorError,
    PingRecord,
    SentMessage,
    SentReply,
    StreamConnection,
    Subscription,
    Violation,
)
from gateway_dingtalk.emulator._server import DEFAULT_APP, DEFAULT_SECRET, DingTalkEmulator

__all__ = [
    "BOT_TOPIC",
    "CARD_TOPIC",
    "DEFAULT_APP",
    "DEFAULT_SECRET",
    "AckRecord",
    "CallRecord",
    "CardClick",
    "CardState",
    "CardUpdate",
    "ConcurrentCardUpdate",
    "Conversation",
    "DingTalkEmulator",
    "Distribution",
    "EmulatorError",
    "PingRecord",
    "SentMessage",
    "SentReply",
    "StreamConnection",
    "Subscription",
    "Violation",
]
