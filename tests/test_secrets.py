"""Secrets: configured ones and the short-lived credentials drivers obtain at run time (tokens,
tickets) are masked in logs; only the latest short-lived ones are remembered."""

from __future__ import annotations

import uuid

from gateway.logs import redact
from gateway.secrets import SHORT_LIVED_KEPT, Secret, known_secret_values


def test_short_lived_secrets_are_masked_and_only_the_latest_are_kept() -> None:
    first = f"t-{uuid.uuid4().hex}"
    token = Secret(first, short_lived=True)
    assert str(token) == "***" and token.reveal() == first
    assert redact(f"GET /x failed: Bearer {first}") == "GET /x failed: Bearer ***"

    later = [f"t-{uuid.uuid4().hex}" for _ in range(SHORT_LIVED_KEPT)]
    for value in later:
        Secret(value, short_lived=True)
    known = known_secret_values()
    assert first not in known  # expired long ago: no longer scanned for in every log line
    assert set(later) <= known


def test_a_configured_secret_is_never_forgotten() -> None:
    configured = f"app-secret-{uuid.uuid4().hex}"
    Secret(configured)
    Secret(configured, short_lived=True)  # the same value fetched again at run time
    for _ in range(SHORT_LIVED_KEPT + 1):
        Secret(f"t-{uuid.uuid4().hex}", short_lived=True)
    assert configured in known_secret_values()
