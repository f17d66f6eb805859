"""The long connection's wire format: ``pbbp2.Frame`` protobuf messages, as typed frozen values.

Feishu's websocket carries one binary message per frame, a proto2 ``pbbp2.Frame`` (schema from
lark-oapi 1.7.5, ``lark_oapi/ws/pb/pbbp2_pb2.py``)::

    message Header { required string key = 1; required string value = 2; }
    message Frame {
      required uint64 SeqID = 1;  required uint64 LogID = 2;
      required int32 service = 3; required int32 method = 4;   // 0 CONTROL, 1 DATA
      repeated Header headers = 5;
      optional string payload_encoding = 6; optional string payload_type = 7;
      optional bytes payload = 8;  optional string LogIDNew = 9;
    }

CONTROL frames carry ``type=ping`` (client, every ``PingInterval`` s) and ``type=pong`` (server,
optionally with a JSON ``ClientConfig`` payload).  DATA frames carry ``type=event|card`` with
``message_id``, ``sum``, ``seq`` (0-based part index) and ``trace_id``; a client ACKs one by
writing the same frame back with a ``biz_rt`` header and the payload ``{"code": 200}`` (plus
``"data"``: base64 of the JSON response, for card callbacks).

The descriptor is built here from a ``FileDescriptorProto`` in a private pool, so there is no
generated module, no ``protoc`` and no clash with lark-oapi's vendored copy of the same schema.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from gateway.errors import DriverError

__all__ = [
    "CONTROL",
    "DATA",
    "Frame",
    "FrameError",
    "ack_payload",
]

#: ``Frame.method``: heartbeats and configuration.
CONTROL: Final = 0
#: ``Frame.method``: events and card callbacks.
DATA: Final = 1


class FrameError(DriverError):
    """Bytes that are not a valid ``pbbp2.Frame`` (the cause is the protobuf error)."""


def _message_class(pool: descriptor_pool.DescriptorPool, name: str) -> type[Message]:
    descriptor = pool.FindMessageTypeByName(name)
    # GetMessageClass appeared in protobuf 4.22; 4.21 only has the factory method.
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:
        return get_class(descriptor)  # type: ignore[no-any-return,unused-ignore]
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)  # type: ignore[no-any-return,unused-ignore]


def _build_schema() -> type[Message]:
    proto = descriptor_pb2.FileDescriptorProto(name="pbbp2.proto", package="pbbp2", syntax="proto2")
    field = descriptor_pb2.FieldDescriptorProto
    required, optional, repeated = (
        field.LABEL_REQUIRED,
        field.LABEL_OPTIONAL,
        field.LABEL_REPEATED,
    )
    # The schema's strings are read as bytes (the same wire type): protobuf refuses a string that
    # is not UTF-8, both when parsing and when writing it back, and an ACK must repeat the frame's
    # headers byte for byte, junk included.  They become str with surrogateescape, which round-trips.
    text = field.TYPE_BYTES
    header = proto.message_type.add(name="Header")
    header.field.add(name="key", number=1, label=required, type=text)
    header.field.add(name="value", number=2, label=required, type=text)
    frame = proto.message_type.add(name="Frame")
    for name, number, label, kind in (
        ("SeqID", 1, required, field.TYPE_UINT64),
        ("LogID", 2, required, field.TYPE_UINT64),
        ("service", 3, required, field.TYPE_INT32),
        ("method", 4, required, field.TYPE_INT32),
        ("payload_encoding", 6, optional, text),
        ("payload_type", 7, optional, text),
        ("payload", 8, optional, field.TYPE_BYTES),
        ("LogIDNew", 9, optional, text),
    ):
        frame.field.add(name=name, number=number, label=label, type=kind)
    frame.field.add(
        name="headers",
        number=5,
        label=repeated,
        type=field.TYPE_MESSAGE,
        type_name=".pbbp2.Header",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())  # what generated *_pb2 modules call
    return _message_class(pool, "pbbp2.Frame")


_PB_FRAME: Final = _build_schema()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@attrs.frozen
class Frame:
    """One ``pbbp2.Frame``.  ``headers`` keeps the wire order (and any duplicate keys)."""

    method: int
    headers: tuple[tuple[str, str], ...] = ()
    payload: bytes = b""
    service: int = 0
    seq_id: int = 0
    log_id: int = 0
    payload_encoding: str = ""
    payload_type: str = ""
    log_id_new: str = ""

    # -- named constructors -------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> Frame:
        """Decode a websocket binary message; :class:`FrameError` if it is not a whole frame."""
        message: Any = _PB_FRAME()
        try:
            message.ParseFromString(data)
        except (DecodeError, ValueError) as exc:
            raise FrameError(f"not a pbbp2 frame ({len(data)} bytes)") from exc
        return cls(
            method=message.method,
            headers=tuple((_text(h.key), _text(h.value)) for h in message.headers),
            payload=message.payload,
            service=message.service,
            seq_id=message.SeqID,
            log_id=message.LogID,
            payload_encoding=_text(message.payload_encoding),
            payload_type=_text(message.payload_type),
            log_id_new=_text(message.LogIDNew),
        )

    @classmethod
    def build(
        cls,
        method: int,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        payload: bytes = b"",
        *,
        service: int = 0,
    ) -> Frame:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        return cls(method, tuple((str(k), str(v)) for k, v in pairs), payload, service)

    @classmethod
    def ping(cls, service: int) -> Frame:
        """The client's heartbeat (lark-oapi: ``SeqID=LogID=0``, ``service`` from the URL)."""
        return cls.build(CONTROL, {"type": "ping"}, service=service)

    @classmethod
    def pong(cls, service: int, client_config: Mapping[str, int] | None = None) -> Frame:
        """The server's answer to a ping; a ``client_config`` payload re-configures the client
        (lark-oapi replaces all four ``ClientConfig`` values with it)."""
        payload = b"" if client_config is None else json.dumps(dict(client_config)).encode()
        return cls.build(CONTROL, {"type": "pong"}, payload, service=service)

    # -- reading and deriving ---------------------------------------------------------------------

    def header(self, key: str) -> str | None:
        """The first value of header ``key``, or None."""
        return next((value for k, value in self.headers if k == key), None)

    @property
    def type(self) -> str | None:
        """The ``type`` header: ``ping``/``pong`` (CONTROL) or ``event``/``card`` (DATA)."""
        return self.header("type")

    def with_header(self, key: str, value: str) -> Frame:
        """A copy with header ``key`` set to ``value`` (replacing every existing one)."""
        kept = tuple(pair for pair in self.headers if pair[0] != key)
        return attrs.evolve(self, headers=(*kept, (key, value)))

    def ack(self, code: int = 200, *, biz_rt_ms: int = 0, response: Any = None) -> Frame:
        """The ACK of this DATA frame: the same frame with ``biz_rt`` and the response payload."""
        return attrs.evolve(
            self.with_header("biz_rt", str(biz_rt_ms)), payload=ack_payload(code, response)
        )

    def to_bytes(self) -> bytes:
        message: Any = _PB_FRAME(
            SeqID=self.seq_id,
            LogID=self.log_id,
            service=self.service,
            method=self.method,
        )
        # proto2 optionals: only set when present, as lark-oapi leaves a ping's payload unset.
        for name, raw in (
            ("payload", self.payload),
            ("payload_encoding", _raw(self.payload_encoding)),
            ("payload_type", _raw(self.payload_type)),
            ("LogIDNew", _raw(self.log_id_new)),
        ):
            if raw:
                setattr(message, name, raw)
        for key, value in self.headers:
            message.headers.add(key=_raw(key), value=_raw(value))
        data: bytes = message.SerializeToString()
        return data


def ack_payload(code: int = 200, response: Any = None) -> bytes:
    """An ACK frame's payload as lark-oapi writes it: ``{"code": 200}``, plus ``"data"`` (base64 of
    the JSON handler response, e.g. a card callback's toast/card) when there is one."""
    body: dict[str, Any] = {"code": code}
    if response is not None:
        encoded = json.dumps(response, ensure_ascii=False).encode()
        body["data"] = base64.b64encode(encoded).decode("ascii")
    return json.dumps(body).encode()
