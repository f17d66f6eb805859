"""The baselines the gateway is compared with, each run as its own process by the benchmarks.

    python bench/_clients.py MODE --endpoint URL --app ID --secret S --template T --agent KIND

MODE is one of:

* ``reference``: the reference design (``shared/reference/add-backend-type-elements.md``): the
  official SDK's ``ChatbotHandler`` whose ``async def process`` calls a synchronous agent and the
  SDK's blocking card calls (``requests``) on the event loop, and returns the ACK at the end.  The
  reference drives a legacy interactive card; here the SDK's AI card calls are used
  (``AICardReplier.create_and_deliver_card`` + ``streaming``) so that every client makes the same
  OpenAPI calls as the gateway.  Its streaming callback is the reference's, verbatim in logic: at
  most 20 updates, one when 2 s passed or 5 chunks are pending.
* ``threadpool``: what a Python developer writes instead: the SDK's ``AsyncChatbotHandler``, which
  ACKs at once and runs the same blocking ``process`` in a thread pool of ``--workers`` threads.
* ``floor``: a minimal hand-written asyncio client (aiohttp websocket + aiohttp OpenAPI calls):
  ACK at once, then create+deliver the card and stream the final text, nothing else (no store, no
  retries, no pacing).  The best one Python event loop can do with these calls.

Each message is answered in its 1:1 chat (``IM_ROBOT`` space of the sender).  The process runs
until it is killed; the benchmark reads the outcome from the emulator's records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import aiohttp
from _agents import run_blocking

BOT_TOPIC = "/v1.0/im/bot/messages/get"
THINKING = "思考中…"
#: The reference design's card pacing (handler.py, ``create_stream_callback``).
MAX_UPDATES = 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a baseline DingTalk client for the benchmarks")
    p.add_argument("mode", choices=["reference", "threadpool", "floor"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--app", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--agent", choices=["instant", "sleep", "chunks"], default="instant")
    p.add_argument("--workers", type=int, default=8, help="threadpool: max_workers (8)")
    return p.parse_args()


# -- the official SDK (reference design and AsyncChatbotHandler) ----------------------------------


def run_sdk(args: argparse.Namespace) -> None:
    # The SDK reads the endpoint when it is imported.
    os.environ["DINGTALK_OPENAPI_ENDPOINT"] = args.endpoint
    import dingtalk_stream
    from dingtalk_stream import AckMessage, AICardReplier, ChatbotHandler, ChatbotMessage

    def answer(client: Any, callback: Any) -> None:
        """The body of the reference design's ``process``, with AI card calls."""
        incoming = ChatbotMessage.from_dict(callback.data)
        text = incoming.text.content.strip()
        replier = AICardReplier(client, incoming)
        card = replier.create_and_deliver_card(args.template, {"content": THINKING})
        full: list[str] = []
        state = {"updates": 0, "last": time.time(), "pending": 0}

        def stream_callback(chunk: str) -> None:
            full.append(chunk)
            state["pending"] += 1
            now = time.time()
            if state["updates"] < MAX_UPDATES - 1 and (
                now - state["last"] >= 2 or state["pending"] >= 5
            ):
                replier.streaming(card, "content", "".join(full), False, False, False)
                state.update(updates=state["updates"] + 1, last=now, pending=0)

        text = run_blocking(args.agent, text, stream_callback)
        replier.streaming(card, "content", text, False, True, False)

    class Reference(ChatbotHandler):
        async def process(self, callback: Any) -> tuple[int, str]:
            answer(self.dingtalk_client, callback)  # blocks the SDK's event loop, as in the design
            return AckMessage.STATUS_OK, "OK"

    class ThreadPool(dingtalk_stream.AsyncChatbotHandler):
        def process(self, callback: Any) -> None:
            answer(self.dingtalk_client, callback)

    handler = Reference() if args.mode == "reference" else ThreadPool(max_workers=args.workers)
    client = dingtalk_stream.DingTalkStreamClient(dingtalk_stream.Credential(args.app, args.secret))
    client.register_callback_handler(ChatbotMessage.TOPIC, handler)
    client.start_forever()


# -- the floor: a minimal asyncio client ----------------------------------------------------------


async def run_floor(args: argparse.Namespace) -> None:
    base = args.endpoint.rstrip("/")
    accept = {"Accept": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async with http.post(
            f"{base}/v1.0/oauth2/accessToken",
            json={"appKey": args.app, "appSecret": args.secret},
            headers=accept,
        ) as response:
            token = (await response.json())["accessToken"]
        auth = {**accept, "x-acs-dingtalk-access-token": token}
        body = {
            "clientId": args.app,
            "clientSecret": args.secret,
            "subscriptions": [{"type": "CALLBACK", "topic": BOT_TOPIC}],
        }
        async with http.post(
            f"{base}/v1.0/gateway/connections/open", json=body, headers=accept
        ) as response:
            opened = await response.json()
        tasks: set[asyncio.Task[None]] = set()

        async def call(method: str, path: str, payload: dict[str, Any]) -> None:
            async with http.request(method, base + path, json=payload, headers=auth) as response:
                await response.read()
                if response.status != 200:
                    print(f"{path}: HTTP {response.status}", flush=True)

        async def handle(data: dict[str, Any]) -> None:
            staff = data["senderStaffId"]
            track = data["msgId"]
            await call(
                "POST",
                "/v1.0/card/instances/createAndDeliver",
                {
                    "cardTemplateId": args.template,
                    "outTrackId": track,
                    "callbackType": "STREAM",
                    "cardData": {"cardParamMap": {"content": THINKING}},
                    "openSpaceId": f"dtv1.card//IM_ROBOT.{staff}",
                    "imRobotOpenSpaceModel": {"supportForward": True},
                    "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT"},
                    "userIdType": 1,
                },
            )
            text = data["text"]["content"].strip()
            if args.agent == "sleep":
                await asyncio.sleep(1.0)
            await call(
                "PUT",
                "/v1.0/card/streaming",
                {
                    "outTrackId": track,
                    "guid": f"{track}-final",
                    "key": "content",
                    "content": text,
                    "isFull": True,
                    "isFinalize": True,
                    "isError": False,
                },
            )

        async with http.ws_connect(f"{opened['endpoint']}?ticket={opened['ticket']}") as ws:
            async for message in ws:
                frame = json.loads(message.data)
                headers = frame["headers"]
                ack = {
                    "code": 200,
                    "headers": {
                        "messageId": headers["messageId"],
                        "contentType": "application/json",
                    },
                    "message": "OK",
                    "data": frame["data"] if frame["type"] == "SYSTEM" else '{"response": null}',
                }
                await ws.send_str(json.dumps(ack))
                if frame["type"] == "CALLBACK" and headers.get("topic") == BOT_TOPIC:
                    task = asyncio.create_task(handle(json.loads(frame["data"])))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)


def main() -> None:
    args = parse_args()
    if args.mode == "floor":
        asyncio.run(run_floor(args))
    else:
        run_sdk(args)


if __name__ == "__main__":
    main()
