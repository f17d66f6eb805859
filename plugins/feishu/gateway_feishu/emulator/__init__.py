"""A local, offline Feishu/Lark: long connection, tenant token, IM messages and CardKit on loopback.

Configure a client with the domain ``emu.url`` (lark-oapi: ``domain=emu.url``), app id
``DEFAULT_APP`` and secret ``DEFAULT_SECRET``.  It asks ``/callback/ws/endpoint`` for a websocket
URL, connects, receives the events the test pushes, ACKs them, and calls the OpenAPI, which points
back at the emulator.  The test then reads what a Feishu user would see (``emu.messages``,
``emu.replies(message_id)``, ``emu.cards``) and what the client did (``emu.acks``, ``emu.calls``,
``emu.violations``, ``emu.rejections``)::

    async with FeishuEmulator() as emu:
        ...  # start the client with domain emu.url, DEFAULT_APP / DEFAULT_SECRET
        await emu.wait_connected()
        sent = await emu.send_message(text="hello")                     # 1:1 chat
        await emu.wait_acked(sent.event_id)
        group = await emu.send_message(text="hi", chat_type="group")    # "@_user_1 hi"
        await emu.wait_until(lambda: emu.replies(group.message_id))
        card = emu.card_of(emu.replies(group.message_id)[0].message_id)
        await emu.wait_until(lambda: card.finished)
        response = await emu.click_card(card.card_id, "alice", {"rating": "up"})

For pytest, ``pytest_plugins = ["gateway_feishu.emulator.fixture"]`` (in the root conftest.py, or
import the fixtures in a nested one) gives ``feishu_emulator`` and ``feishu_emulator_factory``.

**Faithful** (from lark-oapi 1.7.5 ``ws/client.py`` and the open.feishu.cn API pages; checked by
driving the emulator with lark-oapi's own ws and REST clients in
``tests/feishu/test_emulator_vs_sdk.py``):

* ``POST /callback/ws/endpoint`` ``{AppID, AppSecret}`` -> ``{code, msg, data: {URL,
  ClientConfig: {ReconnectCount, ReconnectInterval, ReconnectNonce, PingInterval}}}``; codes 1
  (system busy, while ``refuse_connections``), 514 (auth failed), 1000040350 (more than
  ``max_connections``, 50, live connections of the app).  The URL carries ``device_id`` and
  ``service_id``; a refused websocket handshake carries ``handshake-status``/``handshake-msg``
  (and ``handshake-autherrcode`` 1000040350 for the connection limit).
* Frames are protobuf ``pbbp2.Frame`` (see :mod:`gateway_feishu._frames`).  CONTROL ``ping`` ->
  ``pong`` whose payload is the ClientConfig JSON (all four keys; lark-oapi re-configures itself
  from it).  Events are DATA frames with ``type``, ``message_id``, ``sum``, ``seq`` (0-based),
  ``trace_id``; payloads above ``split_payload`` bytes are sent in ``sum`` parts.  An ACK is the
  same frame written back with payload ``{"code": 200}`` (optionally ``"data"``: base64 JSON) and a
  ``biz_rt`` header, matched by ``message_id`` on the connection that got the frame.
* Un-ACKed events (or ACKed with a code other than 200) are re-pushed after ``ack_timeout`` (3 s,
  the documented limit) with the same payload and ``event_id`` in a new frame (new
  ``message_id``), to one random live connection of the app (cluster mode), waiting for a
  connection if none is live.
* ``im.message.receive_v1`` (schema 2.0): text content ``{"text": ...}`` as a JSON string;
  group messages carry ``mentions`` (``@_user_N`` keys, in the text) and are delivered only when
  they @ the bot.  ``card.action.trigger`` (schema 2.0, microsecond ``create_time``) in a
  ``type=card`` frame, answered within 3 s through the ACK's ``data``.
* Tenant token: flat ``{code, msg, tenant_access_token, expire}``; the same token until less than
  30 min remain; 99991661 without a token, 99991663 for an unknown or expired one (HTTP 400).
* IM: create (``receive_id_type`` chat_id/open_id/user_id/union_id/email), reply and PATCH (cards
  only); ``uuid`` de-duplicates for 1 h (the first message is returned); 5 QPS per chat ->
  230020; 150 KB text / 30 KB card limits -> 230025; interactive content
  ``{"type": "card", "data": {"card_id": ...}}`` sends a CardKit card by reference, once: a card
  entity can be sent only once (a repeated ``uuid`` within the hour still answers with the first
  message, before any check).
* CardKit: create (``card_json``, 30 KB -> 200860, ``update_multi: false`` -> 300302), element
  content (markdown/plain_text only -> 300310; full text; strictly increasing per-card
  ``sequence`` -> 300317; streaming off -> 300309), settings (``{"config": {...}}`` merged), full
  update; another app's card -> 300311; unknown card -> 200740; ``uuid`` replays are not applied
  twice, a reused uuid for another body -> 200770.  Feishu switches streaming off by itself
  ``streaming_timeout`` (10 min) after it was switched on: the next element content call gets
  200850, later ones 300309 (:meth:`FeishuEmulator.expire_streaming` makes it happen now);
  settings and full updates work as on any card, and ``finished`` means the client switched
  streaming off.  Rate limits: 10 ops/s per card; per app and API 50/s and 1000/min (CardKit and
  message send/reply alike) -> HTTP 429 code 99991400 with ``x-ogw-ratelimit-limit`` (that API's
  limit) and ``x-ogw-ratelimit-reset``; each refusal is counted in ``rejections`` (per epoch
  second) and detailed in ``rejection_log``.

**Simplified or invented** (the docs do not say):

* Endpoint tickets are single-use and expire after ``ticket_ttl`` (60 s); a bad ticket is refused
  with HTTP 403 and ``handshake-status: 403``.  The refusal HTTP statuses are the emulator's.
* The re-push schedule of the long connection is undocumented beyond "超时重推": here every
  ``ack_timeout`` s, at most ``max_redeliveries`` (3) times; card callbacks are never re-pushed.
* The per-card 10/s limit answers HTTP 429 with 99991400 but without the ``x-ogw-ratelimit-*``
  headers (those come from Feishu's API gateway, which meters apps, not cards): Feishu documents
  the limit, not its error.  A second send of a card entity answers 230099 (the generic "failed to
  create card content"): the docs state the rule, not its error.  Message PATCH is limited to 5/s per message (230020).  Bad JSON bodies get 9499;
  unknown routes 404; unknown parent messages 230011; unknown element ids 10002.
* Only chats the bot has seen (a pushed message, or :meth:`FeishuEmulator.add_chat`) and users who
  wrote to it are valid targets (else 230002 / 230013).  No scopes, no tenant quotas, no cards
  older than 14 days; ``settings`` without ``config``/``card_link`` changes nothing (as on
  Feishu) and is recorded as a ``settings_without_config`` violation.
* ``fail_next`` defaults: 400 -> 99991663, 429 -> 99991400, others -> code 1 "internal error";
  on ``/ws/v2`` it refuses the websocket upgrade with ``handshake-status`` set to the code.
"""

from gateway_feishu.emulator._payloads import User
from gateway_feishu.emulator._records import (
    AckRecord,
    CallRecord,
    CardClick,
    CardState,
    CardUpdate,
    Chat,
    Delivery,
    EmulatorError,
    PingRecord,
    Rejection,
    SentMessage,
    Violation,
    WsConnection,
)
from gateway_feishu.emulator._server import DEFAULT_APP, DEFAULT_SECRET, FeishuEmulator

__all__ = [
    "DEFAULT_APP",
    "DEFAULT_SECRET",
    "AckRecord",
    "CallRecord",
    "CardClick",
    "CardState",
    "CardUpdate",
    "Chat",
    "Delivery",
    "EmulatorError",
    "FeishuEmulator",
    "PingRecord",
    "Rejection",
    "SentMessage",
    "User",
    "Violation",
    "WsConnection",
]
