"""Operations with the ``dingtalk-stream`` driver: the real ``gateway run`` against the DingTalk
emulator, probed over HTTP — readiness following the connection, platform API calls counted by
outcome, and proactive messages through the OpenAPI group and one-to-one send calls."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from test_ops import get, samples, wait_until
from test_outbound import TOKEN, post

from dingtalk.conftest import SECRET
from dingtalk.test_cli_dingtalk import setup_folder
from gateway_dingtalk.emulator import DingTalkEmulator
from gateway_testkit.process import GatewayProcess, GatewayProcesses


async def boot(
    gateways: GatewayProcesses, root: Path, emu: DingTalkEmulator, app: str
) -> tuple[GatewayProcess, str]:
    setup_folder(root, emu, app, delay=0.0, grace=1.0)
    with (root / "gateway.toml").open("a") as toml:
        toml.write("[http]\nport = 0\n")
    gateway = gateways.run_folder(root, {"DINGTALK_SECRET": SECRET, "GATEWAY_API_TOKEN": TOKEN})
    stderr = await gateway.wait_log("http endpoint listening on http://")
    line = next(ln for ln in stderr.splitlines() if "http endpoint listening on" in ln)
    return gateway, line.rsplit(" ", 1)[1]


def api_calls(metrics: dict[Any, float], outcome: str) -> float:
    key = ("gateway_platform_api_calls_total", (("instance", "bot"), ("outcome", outcome)))
    return metrics.get(key, 0.0)


async def test_readiness_follows_the_stream_connection(
    tmp_path: Path, gateways: GatewayProcesses, emu: DingTalkEmulator, app: str
) -> None:
    gateway, base = await boot(gateways, tmp_path, emu, app)

    async def readyz(expected: int) -> Any:
        status, body, _ = await get(f"{base}/readyz")
        return body if status == expected else None

    body = await wait_until(lambda: readyz(200))
    assert body["instances"] == {"bot": "connected"}

    # DingTalk goes away and refuses new connections: not ready, and says why per instance.
    emu.refuse_connections = True
    assert await emu.drop_connections() == 1
    body = await wait_until(lambda: readyz(503))
    assert body["instances"]["bot"] in ("reconnecting", "starting")
    _, listing, _ = await get(f"{base}/v1/instances")
    bot = listing["instances"]["bot"]
    assert bot["state"] != "connected" and bot["reconnects"] >= 1
    assert SECRET not in str(listing)

    # It comes back: ready again, and the reconnects are counted.
    emu.refuse_connections = False
    await wait_until(lambda: readyz(200), timeout=30)
    metrics = samples((await get(f"{base}/metrics"))[2])
    assert metrics[("gateway_reconnects_total", (("instance", "bot"),))] >= 1
    assert metrics[("gateway_instance_connected", (("instance", "bot"),))] == 1

    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_platform_calls_by_outcome_and_proactive_messages(
    tmp_path: Path, gateways: GatewayProcesses, emu: DingTalkEmulator, app: str
) -> None:
    emu.add_conversation("cidGroup42", app=app, title="ops")
    emu.add_user("alice", app=app)
    gateway, base = await boot(gateways, tmp_path, emu, app)
    await wait_until(lambda: _ready(base))
    url = f"{base}/v1/instances/bot/messages"

    status, body, _ = await post(url, {"to": "cidGroup42", "text": "deploy finished"})
    assert status == 200, body
    status, body, _ = await post(
        url, {"to": "alice", "target": "user", "format": "markdown", "text": "# Report\nall good"}
    )
    assert status == 200, body
    group = [s for s in emu.sent if s.via == "group"]
    direct = [s for s in emu.sent if s.via == "otm"]
    assert [(s.conversation_id, s.msgtype, s.text) for s in group] == [
        ("cidGroup42", "text", "deploy finished")
    ]
    assert [(s.user_id, s.msgtype, s.title) for s in direct] == [("alice", "markdown", "Report")]
    assert direct[0].text == "# Report\nall good"

    # Refusals are the caller's problem (422), with DingTalk's reason; nothing is sent.
    status, body, _ = await post(url, {"to": "cidUnknown", "text": "x"})
    assert status == 422 and "openConversationId" in body["error"], body
    status, body, _ = await post(url, {"to": "nobody", "target": "user", "text": "x"})
    assert status == 422 and "nobody" in body["error"], body

    # A throttled call is retried (and counted as such) and the message still goes out.
    before = samples((await get(f"{base}/metrics"))[2])
    emu.fail_next("/v1.0/robot/groupMessages/send", count=1, status=403)
    status, body, _ = await post(url, {"to": "cidGroup42", "text": "after a throttle"})
    assert status == 200, body
    after = samples((await get(f"{base}/metrics"))[2])
    assert api_calls(after, "rate_limited") == api_calls(before, "rate_limited") + 1
    assert api_calls(after, "ok") > api_calls(before, "ok")
    assert [s.text for s in emu.sent if s.via == "group"][-1] == "after a throttle"
    assert not emu.violations

    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()
    assert TOKEN not in gateway.stderr and SECRET not in gateway.stderr


async def _ready(base: str) -> bool:
    return (await get(f"{base}/readyz"))[0] == 200
