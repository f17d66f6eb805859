"""Proactive messages: sending through an instance when nobody asked (the outbound API).

:func:`send` is what ``POST /v1/instances/{name}/messages`` and ``gateway send`` end in.  It splits a
long text the way answers are split, hands each part to the driver's :meth:`~gateway.driver.Driver.
send`, and honours the caller's idempotency key through the :class:`~gateway.store.Outbox`: a key
sends at most once, and a retry with it returns what the first request got.
"""

from __future__ import annotations

import hashlib
import json

import attrs

from gateway.driver import Driver
from gateway.errors import RequestConflict, SendRejected
from gateway.metrics import Metrics
from gateway.models import Outgoing
from gateway.splitter import split_text
from gateway.store import ClaimState, Outbox

__all__ = ["Sent", "send"]


@attrs.frozen
class Sent:
    """What a proactive send did: the platform's ids of the parts sent, and whether this was the
    replay of an earlier request with the same idempotency key (then nothing was sent now)."""

    ids: tuple[str, ...]
    replayed: bool = False


def _fingerprint(message: Outgoing) -> str:
    what = [message.target.value, message.to, message.text, message.markdown, message.title]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


async def send(driver: Driver, outbox: Outbox, metrics: Metrics, message: Outgoing) -> Sent:
    """Send ``message`` through ``driver``; see the module docstring.

    Raises :class:`~gateway.errors.SendRejected` when the driver cannot send proactively or the
    platform refuses, :class:`~gateway.errors.RequestConflict` for a busy or reused key, and the
    driver's errors for transient failures (the key is then free for a retry).
    """
    if not driver.capabilities.proactive:
        raise SendRejected(f"the {type(driver).title or 'driver'} cannot send proactive messages")
    key = message.idempotency_key
    if key:
        claim = await outbox.claim(message.instance, key, _fingerprint(message))
        if claim.state is ClaimState.SENT:
            return Sent(claim.ids, replayed=True)
        if claim.state is ClaimState.MISMATCH:
            raise RequestConflict(f"idempotency key {key!r} was already used for another message")
        if claim.state is ClaimState.SENDING:
            raise RequestConflict(
                f"a request with idempotency key {key!r} is in progress or was interrupted "
                "(outcome unknown); retry later, or use a new key to send again"
            )
    limit = driver.capabilities.max_text_length
    texts = [part.text for part in split_text(message.text, limit)] if limit else [message.text]
    ids: list[str] = []
    try:
        for text in texts:
            ids.append(await driver.send(attrs.evolve(message, text=text)))
    except BaseException:
        # Only an unsent first part leaves nothing behind: with parts already out, a retry would
        # repeat them, so the key stays taken (and reports "outcome unknown").
        if key and not ids:
            await outbox.release(message.instance, key)
        metrics.message(message.instance, "send_failed")
        raise
    if key:
        await outbox.complete(message.instance, key, tuple(ids))
    metrics.message(message.instance, "sent", len(ids))
    return Sent(tuple(ids))
