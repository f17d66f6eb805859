"""The outbound API end to end: ``POST /v1/instances/{name}/messages`` on the real ``gateway run``
(a subprocess, echo driver) and ``gateway send``: token handling, validation, idempotency, splitting,
and the token kept out of every log and answer."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
from test_cli import echo_instance, setup_folder, start_gateway
from test_ops import get, memory_instance, samples

from gateway_testkit.process import (
    GatewayProcess,
    GatewayProcesses,
    free_port,
    loopback_env,
    run_cli,
)

TOKEN = "outbound-token-5d1c9f0e7a"


async def post(
    url: str, body: Any, token: str | None = TOKEN, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, str | bytes) else {"json": body}
        async with session.post(url, headers=sent, **kwargs) as response:
            return response.status, await response.json(), response.headers


async def boot(
    gateways: GatewayProcesses,
    root: Path,
    *,
    token: str | None,
    toml: str = "",
    port: int = 0,
    others: dict[str, str] | None = None,
) -> tuple[GatewayProcess, str, int]:
    """A gateway with one echo instance ``bot`` (parts of at most 40 characters), and ``others``."""
    port = port or free_port()
    instance = echo_instance(port, settings="max_text_length = 40\n")
    instances = {"bot": instance, **(others or {})}
    setup_folder(root, instances, gateway_toml=f"[http]\nport = 0\n{toml}")
    env = loopback_env({"GATEWAY_API_TOKEN": token}, drop=["GATEWAY_API_TOKEN"])
    gateway = start_gateway(gateways, root, env=env, global_args=("--log-level", "debug"))
    stderr = await gateway.wait_log("http endpoint listening on http://")
    line = next(ln for ln in stderr.splitlines() if "http endpoint listening on" in ln)
    await gateway.wait_log("echo listening on")
    return gateway, line.rsplit(" ", 1)[1], port


async def sent_messages(port: int) -> list[dict[str, Any]]:
    status, body, _ = await get(f"http://127.0.0.1:{port}/sent")
    assert status == 200
    return list(body["messages"])


async def test_send_auth_validation_idempotency_and_splitting(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    gateway, base, port = await boot(gateways, tmp_path, token=TOKEN)
    url = f"{base}/v1/instances/bot/messages"
    hello = {"to": "c9", "text": "hello from a cron job"}

    # Authentication: none, wrong scheme, wrong token.
    status, body, headers = await post(url, hello, token=None)
    assert status == 401 and "bearer token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await post(url, hello, token="wrong-token"))[0] == 401
    assert (await post(url, hello, token=None, headers={"Authorization": TOKEN}))[0] == 401
    assert await sent_messages(port) == []

    # Validation: each problem is a 400 naming the field; nothing is sent.
    for bad, field in [
        ("not json", "JSON object"),
        (["a list"], "JSON object"),
        ({"text": "no recipient"}, "'to'"),
        ({"to": "c9"}, "'text'"),
        ({"to": "c9", "text": "   "}, "'text'"),
        ({"to": 7, "text": "x"}, "'to'"),
        ({"to": "c9", "text": "x", "target": "channel"}, "'target'"),
        ({"to": "c9", "text": "x", "format": "html"}, "'format'"),
        ({"to": "c9", "text": "x", "colour": "red"}, "colour"),
        ({"to": "c9", "text": "x", "title": 3}, "'title'"),
    ]:
        status, body, _ = await post(url, bad)
        assert status == 400, (bad, body)
        assert field in body["error"], (bad, body)
    assert (await post(f"{base}/v1/instances/nobody/messages", hello))[0] == 404
    assert await sent_messages(port) == []

    # A plain send, to a user, as markdown.
    status, body, headers = await post(
        url, {**hello, "target": "user", "format": "markdown", "title": "Cron"}
    )
    assert status == 200, body
    assert body["parts"] == 1 and body["replayed"] is False and body["target"] == "user"
    assert "Idempotent-Replayed" not in headers
    [first] = await sent_messages(port)
    assert first["id"] == body["message_ids"][0]
    assert (first["to"], first["target"], first["format"]) == ("c9", "user", "markdown")
    assert first["text"] == hello["text"] and first["title"] == "Cron"

    # Idempotency: the same key sends once; a retry gets the first answer; another text is a 409.
    keyed = {"Idempotency-Key": "job-42"}
    status, body, _ = await post(url, hello, headers=keyed)
    assert status == 200 and body["replayed"] is False
    status, again, headers = await post(url, hello, headers=keyed)
    assert status == 200 and again["replayed"] is True
    assert again["message_ids"] == body["message_ids"]
    assert headers["Idempotent-Replayed"] == "true"
    status, conflict, _ = await post(url, {**hello, "text": "other"}, headers=keyed)
    assert status == 409 and "job-42" in conflict["error"]
    # ... also given in the body
    status, in_body, _ = await post(url, {**hello, "idempotency_key": "job-42"})
    assert status == 200 and in_body["replayed"] is True
    assert len(await sent_messages(port)) == 2

    # A text longer than the driver's parts is split like an answer.
    long_text = " ".join(f"word{i}" for i in range(30))
    status, body, _ = await post(url, {"to": "c9", "text": long_text})
    assert status == 200 and body["parts"] > 1
    parts = (await sent_messages(port))[2:]
    assert len(parts) == body["parts"] and all(len(p["text"]) <= 40 for p in parts)
    assert " ".join(p["text"].strip() for p in parts).split() == long_text.split()

    metrics = samples((await get(f"{base}/metrics"))[2])
    assert metrics[
        ("gateway_messages_total", (("instance", "bot"), ("outcome", "sent")))
    ] == 2 + len(parts)

    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()
    assert TOKEN not in gateway.stderr + gateway.stdout


async def test_sending_is_off_without_a_token(tmp_path: Path, gateways: GatewayProcesses) -> None:
    gateway, base, port = await boot(gateways, tmp_path, token=None)
    status, body, _ = await post(f"{base}/v1/instances/bot/messages", {"to": "c", "text": "x"})
    assert status == 404 and "GATEWAY_API_TOKEN" in body["error"]
    assert await sent_messages(port) == []
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_the_token_can_come_from_gateway_toml(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    toml = 'token = "${MY_SEND_TOKEN}"\n'
    port = free_port()
    setup_folder(tmp_path, {"bot": echo_instance(port)}, gateway_toml=f"[http]\nport = 0\n{toml}")
    env = loopback_env({"MY_SEND_TOKEN": TOKEN}, drop=["GATEWAY_API_TOKEN"])
    gateway = start_gateway(gateways, tmp_path, env=env)
    stderr = await gateway.wait_log("http endpoint listening on http://")
    base = next(ln for ln in stderr.splitlines() if "listening on http" in ln).rsplit(" ", 1)[1]
    await gateway.wait_log("echo listening on")
    status, body, _ = await post(f"{base}/v1/instances/bot/messages", {"to": "c", "text": "hi"})
    assert status == 200, body
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_gateway_send_command(tmp_path: Path, gateways: GatewayProcesses) -> None:
    gateway, base, port = await boot(gateways, tmp_path, token=TOKEN)
    env = loopback_env({"GATEWAY_API_TOKEN": TOKEN})

    def send(*args: str, env: dict[str, str] = env) -> Any:
        return run_cli("send", *args, "--url", base, cwd=tmp_path, env=env)

    result = await asyncio.to_thread(send, "bot", "--to", "c1", "--key", "k1", "hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent: 1 part(s) to c1 via bot")
    result = await asyncio.to_thread(send, "bot", "--to", "c1", "--key", "k1", "hello there")
    assert result.returncode == 0 and result.stdout.startswith("already sent"), result.stdout
    result = await asyncio.to_thread(send, "bot", "--to", "u7", "--user", "--markdown", "**hi**")
    assert result.returncode == 0, result.stderr
    sent = await sent_messages(port)
    assert [(m["to"], m["target"], m["format"], m["text"]) for m in sent] == [
        ("c1", "conversation", "text", "hello there"),
        ("u7", "user", "markdown", "**hi**"),
    ]

    refused = await asyncio.to_thread(send, "nobody", "--to", "c1", "x")
    assert refused.returncode == 1 and "HTTP 404" in refused.stderr
    wrong = await asyncio.to_thread(
        send, "bot", "--to", "c1", "x", env=loopback_env({"GATEWAY_API_TOKEN": "not-it"})
    )
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
    missing = await asyncio.to_thread(
        send, "bot", "--to", "c1", "x", env=loopback_env(drop=["GATEWAY_API_TOKEN"])
    )
    assert missing.returncode == 2 and "GATEWAY_API_TOKEN" in missing.stderr
    for result in (refused, wrong, missing):
        assert "Traceback" not in result.stderr and TOKEN not in result.stderr

    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_limits_and_unexpected_failures_are_json_errors(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    faulty = memory_instance(f'send_error = "driver bug near {TOKEN}"')
    gateway, base, port = await boot(
        gateways,
        tmp_path,
        token=TOKEN,
        toml="max_message_chars = 100\n",
        others={"faulty": faulty},
    )
    url = f"{base}/v1/instances/bot/messages"

    # The text limit ([http] max_message_chars) is named in the refusal.
    status, body, _ = await post(url, {"to": "c9", "text": "x" * 101})
    assert status == 413, body
    assert "101 characters" in body["error"] and "limit is 100" in body["error"]
    assert "max_message_chars" in body["error"]
    # A body far beyond what the limit allows is refused before it is parsed.
    status, body, _ = await post(url, {"to": "c9", "text": "x" * 100_000})
    assert status == 413 and "the body is larger than" in body["error"], body
    assert await sent_messages(port) == []
    status, body, _ = await post(url, {"to": "c9", "text": "y" * 100})
    assert status == 200 and body["parts"] == 3, body

    # An unexpected exception in a driver's send: a 500 that tells nothing, a logged traceback,
    # the failure counted, and the idempotency key free for a retry (nothing was sent).
    faulty_url = f"{base}/v1/instances/faulty/messages"
    for _ in range(2):
        status, body, _ = await post(
            faulty_url, {"to": "c1", "text": "hi"}, headers={"Idempotency-Key": "k"}
        )
        assert status == 500, body
        assert body == {"error": "internal error; the gateway logged the details"}
    stderr = await gateway.wait_log("RuntimeError: driver bug near ***")
    assert "POST /v1/instances/faulty/messages failed" in stderr
    metrics = samples((await get(f"{base}/metrics"))[2])
    assert (
        metrics[("gateway_messages_total", (("instance", "faulty"), ("outcome", "send_failed")))]
        == 2
    )

    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()
    assert TOKEN not in gateway.stderr + gateway.stdout


async def test_gateway_send_quotes_the_instance_name(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    gateway, base, port = await boot(gateways, tmp_path, token=TOKEN)
    env = loopback_env({"GATEWAY_API_TOKEN": TOKEN})
    result = await asyncio.to_thread(
        run_cli, "send", "no/such", "--to", "c1", "x", "--url", base, cwd=tmp_path, env=env
    )
    assert result.returncode == 1
    # One path segment reached the server: its answer names the whole name.
    assert "HTTP 404" in result.stderr and "no running instance named 'no/such'" in result.stderr
    invalid = await asyncio.to_thread(
        run_cli, "send", "bot", "--to", "c1", "x", "--url", "bot", cwd=tmp_path, env=env
    )
    assert invalid.returncode == 2 and "invalid URL 'bot'" in invalid.stderr
    assert await sent_messages(port) == []
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_an_idempotency_key_survives_a_restart(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    """The keys are in the state directory's database: a client retrying after the gateway was
    restarted gets the first answer, and nothing is sent twice."""
    hello = {"to": "c9", "text": "hello once"}
    keyed = {"Idempotency-Key": "restart-1"}
    first, base, port = await boot(gateways, tmp_path, token=TOKEN)
    status, body, _ = await post(f"{base}/v1/instances/bot/messages", hello, headers=keyed)
    assert status == 200 and body["replayed"] is False
    first.send(signal.SIGTERM)
    assert await first.wait_exit(10) == 0, first.describe()

    second, base, _ = await boot(gateways, tmp_path, token=TOKEN, port=port)
    status, again, _ = await post(f"{base}/v1/instances/bot/messages", hello, headers=keyed)
    assert status == 200 and again["replayed"] is True, again
    assert again["message_ids"] == body["message_ids"]
    assert await sent_messages(port) == []  # echo's list is new with the process: nothing sent
    second.send(signal.SIGTERM)
    assert await second.wait_exit(10) == 0, second.describe()


async def test_concurrent_requests_with_one_key_send_once(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    gateway, base, port = await boot(gateways, tmp_path, token=TOKEN)
    url = f"{base}/v1/instances/bot/messages"
    hello = {"to": "c9", "text": "only once, please"}
    answers = await asyncio.gather(
        *(post(url, hello, headers={"Idempotency-Key": "same"}) for _ in range(20))
    )
    firsts = [body for status, body, _ in answers if status == 200 and not body["replayed"]]
    assert len(firsts) == 1, answers
    for status, body, _ in answers:
        # The others either replay the first answer or are told it is still in progress.
        if status == 200:
            assert body["message_ids"] == firsts[0]["message_ids"]
        else:
            assert status == 409 and "in progress" in body["error"], body
    assert len(await sent_messages(port)) == 1
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()
