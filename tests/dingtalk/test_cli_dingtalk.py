"""The real ``gateway run`` command with the ``dingtalk-stream`` driver, against the DingTalk emulator.

The emulator runs in the test process on 127.0.0.1; the gateway is a subprocess (``python -m
gateway.cli``) with its own folder and state directory.  Every process is killed at teardown and every
wait has a deadline.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from dingtalk.conftest import SECRET
from gateway_dingtalk.emulator import CardState, DingTalkEmulator, SentMessage
from gateway_testkit.dingtalk import TEMPLATE, reply_id_for
from gateway_testkit.process import GatewayProcess, GatewayProcesses, write_folder

CREATE = "/v1.0/card/instances/createAndDeliver"
INTERRUPTED = "The answer was interrupted because the gateway is stopping."

Factory = Callable[..., Awaitable[DingTalkEmulator]]


def setup_folder(
    root: Path, emu: DingTalkEmulator, app: str, *, delay: float, grace: float
) -> None:
    """``root/instances/bot.toml`` (the secret from the environment) and ``root/gateway.toml``."""
    settings = {
        "client_id": app,
        "client_secret": "${DINGTALK_SECRET}",
        "endpoint": emu.url,
        "card_template_id": TEMPLATE,
        "card_update_interval": 0.02,
        "rate": 1000.0,
    }
    write_folder(root, "dingtalk-stream", settings, delay=delay, update_interval=0.05, grace=grace)


def run(gateways: GatewayProcesses, root: Path, secret: str = SECRET) -> GatewayProcess:
    return gateways.run_folder(root, {"DINGTALK_SECRET": secret})


async def connected(emu: DingTalkEmulator, gateway: GatewayProcess, opens: int = 1) -> None:
    async with asyncio.timeout(20):
        while len(emu.connections) < 1 or emu.connection_opens < opens:
            assert gateway.returncode is None, gateway.describe()
            await asyncio.sleep(0.02)


def card_of(emu: DingTalkEmulator, sent: SentMessage) -> CardState | None:
    return emu.cards.get(reply_id_for(sent.msg_id))


# -- (a) SIGTERM in the middle of a streamed answer -------------------------------------------------


async def test_sigterm_mid_answer_finalises_the_card_and_closes_the_connection(
    tmp_path: Path, gateways: GatewayProcesses, emu: DingTalkEmulator, app: str
) -> None:
    setup_folder(tmp_path, emu, app, delay=0.2, grace=0.3)
    gateway = run(gateways, tmp_path)
    async with asyncio.timeout(40):
        await connected(emu, gateway)
        text = " ".join(f"word{i}" for i in range(20))  # 4 s of answer
        sent = await emu.send_message(text=text, sender_staff_id="alice")
        await emu.wait_acked(sent.msg_id, timeout=5)
        await emu.wait_until(
            lambda: (card := card_of(emu, sent)) is not None and card.streaming_calls >= 1, 5
        )

        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(10) == 0, gateway.describe()
        card = card_of(emu, sent)
        assert card is not None and card.ended, card
        shown = card.content["content"]
        if card.status == "failed":
            answered, _, reason = shown.partition("\n\n> ")
            assert reason == INTERRUPTED, shown
            assert text.startswith(answered) and answered, shown
        else:
            assert shown == text
        await emu.wait_until(lambda: not emu.connections, 3)
        assert [c.closed_by for c in emu.connection_history] == ["client"]
    stderr = gateway.stderr
    assert "SIGTERM received" in stderr
    assert "[bot]" in stderr and "stopped" in stderr
    assert "Traceback" not in stderr, stderr


# -- (b) kill -9 in the middle of a burst, then a restart -------------------------------------------


async def test_a_killed_gateway_resumes_every_answer_once_after_a_restart(
    tmp_path: Path, gateways: GatewayProcesses, emu: DingTalkEmulator, app: str
) -> None:
    setup_folder(tmp_path, emu, app, delay=0.2, grace=1.0)
    first = run(gateways, tmp_path)
    async with asyncio.timeout(60):
        await connected(emu, first)
        texts = [f"burst message number {i} with some more words" for i in range(10)]  # 1.8 s
        burst = await asyncio.gather(
            *(emu.send_message(text=t, sender_staff_id=f"user{i}") for i, t in enumerate(texts))
        )
        for sent in burst:
            await emu.wait_acked(sent.msg_id, timeout=5)

        def all_streaming() -> bool:
            return all((c := card_of(emu, s)) is not None and c.streaming_calls >= 1 for s in burst)

        await emu.wait_until(all_streaming, 5)
        first.kill()  # SIGKILL: no shutdown, no finalisation
        assert await first.wait_exit(5) == -signal.SIGKILL
        unfinished = [s for s in burst if not card_of(emu, s).ended]  # type: ignore[union-attr]
        assert unfinished, "every answer was done before the kill: the test proves nothing"
        await emu.wait_until(lambda: not emu.connections, 3)

        second = run(gateways, tmp_path)  # same folder, same state directory
        await connected(emu, second, opens=2)

        def all_ended() -> bool:
            return all((c := card_of(emu, s)) is not None and c.ended for s in burst)

        await emu.wait_until(all_ended, 20)
        await asyncio.sleep(0.2)
        for sent, text in zip(burst, texts, strict=True):
            track = reply_id_for(sent.msg_id)
            card = emu.cards[track]
            assert (card.status, card.content["content"]) == ("finished", text)
            assert sum(1 for u in card.history if u.is_finalize or u.is_error) == 1
            created = [
                c
                for c in emu.calls
                if c.path == CREATE and c.status == 200 and c.body.get("outTrackId") == track
            ]
            assert len(created) == 1, track  # resumed answers reuse the card they have
        assert len(emu.cards) == 10  # no second card, no continuation card
        assert emu.sent == []  # and no markdown fallback message
        assert not [v for v in emu.violations if v.kind == "stream_after_end"]
        assert all(emu.deliveries(s.msg_id) == 1 for s in burst)

        await second.wait_log(f"resuming {len(unfinished)} unanswered message(s)", timeout=5)
        second.send(signal.SIGTERM)
        assert await second.wait_exit(10) == 0, second.describe()
    assert "Traceback" not in second.stderr, second.stderr


# -- (c) wrong credentials ---------------------------------------------------------------------------


async def test_wrong_credentials_are_reported_readably_without_the_secret(
    tmp_path: Path, gateways: GatewayProcesses, emu: DingTalkEmulator, app: str
) -> None:
    wrong = "cli-wrong-secret-0d5a7e"
    setup_folder(tmp_path, emu, app, delay=0.0, grace=0.5)
    gateway = run(gateways, tmp_path, secret=wrong)
    async with asyncio.timeout(30):
        stderr = await gateway.wait_log(
            "DingTalk rejected the client id/secret of instance bot", timeout=20
        )
        assert emu.connections == []
        gateway.send(signal.SIGTERM)
        assert await gateway.wait_exit(10) == 0, gateway.describe()
    stderr, stdout = gateway.stderr, gateway.stdout
    [line] = [
        line
        for line in stderr.splitlines()
        if "DingTalk rejected the client id/secret of instance bot" in line
    ]
    assert "[bot]" in line and "ERROR" in line and app in line
    assert wrong not in stderr and wrong not in stdout
    assert SECRET not in stderr and SECRET not in stdout
    assert "Traceback" not in stderr, stderr
