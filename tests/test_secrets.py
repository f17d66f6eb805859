"""Secrets: configured ones and the short-lived credentials drivers obtain at run time (tokens,
tickets) are masked in logs; only the latest short-lived ones are remembered.  A proxy URL's
password is one too."""

from __future__ import annotations

import uuid

from gateway.logs import redact
from gateway.secrets import SHORT_LIVED_KEPT, Secret, known_secret_values
from gateway_dingtalk.settings import DingTalkSettings
from gateway_feishu.settings import FeishuSettings


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


def test_a_proxy_password_never_shows_in_settings_or_logs() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    proxy = f"socks5://alice:{password}@127.0.0.1:1080"
    for settings in (
        DingTalkSettings(
            client_id="ding",
            client_secret=Secret("s3cret-ding"),
            reply_mode="markdown",
            proxy=proxy,
        ),
        FeishuSettings(app_id="cli_x", app_secret=Secret("s3cret-feishu"), proxy=proxy),
    ):
        shown = repr(settings)
        assert password not in shown
        assert "socks5://alice:***@127.0.0.1:1080" in shown
    assert redact(f"proxy {proxy} refused the connection") == (
        "proxy socks5://alice:***@127.0.0.1:1080 refused the connection"
    )


def test_a_proxy_without_a_password_is_shown_as_it_is() -> None:
    settings = DingTalkSettings(
        client_id="ding",
        client_secret=Secret("s3cret-ding"),
        reply_mode="markdown",
        proxy="http://127.0.0.1:3128",
    )
    assert "proxy='http://127.0.0.1:3128'" in repr(settings)
