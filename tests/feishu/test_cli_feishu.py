"""The real ``gateway run`` command with the ``feishu`` driver, against the Feishu emulator.

The emulator runs in the test process on 127.0.0.1; the gateway is a subprocess (``python -m
gateway.cli``) with its own folder and state directory.  Every process is killed at teardown and every
wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway_feishu.emulator import CardState, Delivery, FeishuEmulator
from gateway_testkit.process import (
    GatewayProcess,
    GatewayProcesses,
    loopback_env,
    run_cli,
    write_folder,
)

SECRET = "cli-fs-secret-5b20c4e7"
CARDS = "/open-apis/cardkit/v1/cards"

Factory = Callable[..., Awaitable[FeishuEmulator]]


@pytest.fixture
def app() -> str:
    return f"cli_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def emu(app: str, feishu_emulator_factory: Factory) -> FeishuEmulator:
    return await feishu_emulator_factory(apps={app: SECRET}, ack_timeout=2.0)


def setup_folder(root: Path, emu: FeishuEmulator, app: str, *, delay: float, grace: float) -> None:
    """``root/instances/bot.toml`` (the secret from the environment) and ``root/gateway.toml``."""
    settings = {
        "app_id": app,
        "app_secret": "${FEISHU_APP_SECRET}",
        "domain": emu.url,
        "card_update_interval": 0.11,
        "rate": 1000.0,
    }
    write_folder(
        root,
        "feishu",
        settings,
        delay=delay,
        update_interval=0.1,
        grace=grace,
        gateway_toml="[http]\nenabled = false\n",
    )


def run(gateways: GatewayProcesses, root: Path, secret: str = SECRET) -> GatewayProcess:
    return gateways.run_folder(root, {"FEISHU_APP_SECRET": secret})


async def connected(emu: FeishuEmulator, gateway: GatewayProcess, opens: int = 1) -> None:
    async with asyncio.timeout(20):
        while not emu.live_connections or len(emu.connection_history) < opens:
            assert gateway.returncode is None, gateway.describe()
            await asyncio.sleep(0.02)


def card_of(emu: FeishuEmulator, sent: Delivery) -> CardState | None:
    cards = [m.card_id for m in emu.replies(sent.message_id or "") if m.card_id is not None]
    return emu.cards[cards[0]] if cards else None


def text_of(sent: Delivery) -> str:
    return str(json.loads(sent.payload["event"]["message"]["content"])["text"])


async def test_a_killed_gateway_resumes_every_answer_in_the_card_it_already_has(
    tmp_path: Path, gateways: GatewayProcesses, emu: FeishuEmulator, app: str
) -> None:
    setup_folder(tmp_path, emu, app, delay=0.2, grace=1.0)
    first = run(gateways, tmp_path)
    async with asyncio.timeout(60):
        await connected(emu, first)
        texts = [f"burst message number {i} with some more words" for i in range(6)]  # 1.8 s
        burst = [await emu.send_message(t, sender=f"user{i}") for i, t in enumerate(texts)]
        for sent in burst:
            await emu.wait_acked(sent.event_id, timeout=5)

        def all_streaming() -> bool:
            return all((c := card_of(emu, s)) is not None and c.content_updates >= 1 for s in burst)

        await emu.wait_until(all_streaming, 10)
        first.kill()  # SIGKILL: no shutdown, no finalisation
        assert await first.wait_exit(5) == -signal.SIGKILL
        unfinished = [s for s in burst if not card_of(emu, s).finished]  # type: ignore[union-attr]
        assert unfinished, "every answer was done before the kill: the test proves nothing"
        cards_before = {s.event_id: card_of(emu, s).card_id for s in burst}  # type: ignore[union-attr]
        await emu.wait_until(lambda: not emu.live_connections, 3)

        second = run(gateways, tmp_path)  # same folder, same state directory
        await connected(emu, second, opens=2)

        def all_finished() -> bool:
            return all((c := card_of(emu, s)) is not None and c.finished for s in burst)

        await emu.wait_until(all_finished, 30)
        for sent in burst:
            card = card_of(emu, sent)
            assert card is not None
            await emu.wait_until(lambda card=card: card.shows_buttons, 5)
            assert card.card_id == cards_before[sent.event_id]  # the same card, updated
            assert card.contents["answer"] == text_of(sent)
            assert len(emu.replies(sent.message_id or "")) == 1  # sent once, never again
        assert emu.count(CARDS, method="POST", status=200) == len(burst)  # no second card
        assert not [v for v in emu.violations if v.kind == "sequence_not_increasing"]
        assert emu.violations == []

        await second.wait_log(f"resuming {len(unfinished)} unanswered message(s)", timeout=5)
        second.send(signal.SIGTERM)
        assert await second.wait_exit(10) == 0, second.describe()
    assert "Traceback" not in second.stderr, second.stderr


async def test_wrong_credentials_are_reported_readably_without_the_secret(
    tmp_path: Path, gateways: GatewayProcesses, emu: FeishuEmulator, app: str
) -> None:
    wrong = "cli-wrong-secret-8e14b6"
    setup_folder(tmp_path, emu, app, delay=0.0, grace=0.5)
    gateway = run(gateways, tmp_path, secret=wrong)
    async with asyncio.timeout(30):
        await gateway.wait_log("Feishu rejected the app id/secret", timeout=20)
        assert emu.live_connections == []
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(10) == 0, gateway.describe()
    stderr, stdout = gateway.stderr, gateway.stdout
    [line, *_] = [x for x in stderr.splitlines() if "Feishu rejected the app id/secret" in x]
    assert "[bot]" in line and app in line
    assert wrong not in stderr and wrong not in stdout
    assert SECRET not in stderr and SECRET not in stdout
    assert "Traceback" not in stderr, stderr


def test_gateway_new_scaffolds_a_feishu_instance_that_checks(tmp_path: Path) -> None:
    new = run_cli("new", "feishu", "mybot", cwd=tmp_path)
    assert new.returncode == 0, new.stderr
    written = (tmp_path / "instances" / "mybot.toml").read_text()
    assert 'type = "feishu"' in written and 'app_secret = "${MYBOT_APP_SECRET}"' in written
    assert '# domain = "feishu"' in written and "# card_update_interval = 0.3" in written
    env = loopback_env({"MYBOT_APP_ID": "cli_scaffolded", "MYBOT_APP_SECRET": "s3cr3t-value"})
    check = run_cli("check", "--instances", tmp_path / "instances", cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stderr
    assert "mybot: feishu driver, echo agent (enabled)" in check.stdout
    assert "s3cr3t-value" not in check.stdout + check.stderr
