"""The IPC requests (docs/ipc.md) as strict pydantic models, and their untrusted parser.

Strict: a JSON ``true`` is not the port 1 and ``"5"`` is not the timeout 5; every field has the
JSON type the docs name (an integer is still a valid number of seconds).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import BadRequestError
from ..ipc import (
    COMPACT_QUIET,
    COMPACT_REPLY,
    COMPACT_REQUEST,
    COMPACT_STREAM_SEND,
    MAX_CREDIT_BYTES,
    MAX_CREDIT_MESSAGES,
    decode_data,
)
from ..patterns.frames import MAX_TOPIC

Encoding = Literal["utf-8", "base64"]
Port = Annotated[int, Field(ge=1, le=65535)]
Timeout = Annotated[float, Field(gt=0, le=7 * 86400)]
Name = Annotated[str, Field(min_length=1, max_length=253)]
RequestId = int | str


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: RequestId | None = None


class PayloadRequest(BaseRequest):
    """A request that carries a message: in ``data`` (JSON text), or in a payload frame that
    the server puts in ``data`` as bytes (JSON has no bytes: a client cannot)."""

    data: str | bytes | None = None
    encoding: Encoding = "utf-8"

    def attach(self, frame: bytes) -> None:
        """The request's payload frame (docs/ipc.md, Framing)."""
        if self.data is not None:
            raise BadRequestError(
                f"'{self.cmd_name()}' has both a 'data' field and a payload frame: send one")
        self.data = frame

    def payload(self) -> bytes:
        if isinstance(self.data, bytes):
            return self.data
        if self.data is None:
            raise BadRequestError(
                f"'{self.cmd_name()}' needs its payload: a 'data' field or a payload frame")
        return decode_data(self.data, self.encoding)

    def cmd_name(self) -> str:
        return str(getattr(self, "cmd", "?"))


class InfoRequest(BaseRequest):
    cmd: Literal["info"]


class PeersRequest(BaseRequest):
    cmd: Literal["peers"]


class ResolveRequest(BaseRequest):
    cmd: Literal["resolve"]
    name: Name


class AddPeerRequest(BaseRequest):
    cmd: Literal["add_peer"]
    node_id: Name
    address: Name
    hostname: Name | None = None


class TrustAddRequest(BaseRequest):
    cmd: Literal["trust_add"]
    target: Name
    reason: str = Field(default="", max_length=500)


class TrustApproveRequest(BaseRequest):
    cmd: Literal["trust_approve"]
    target: Name


class TrustRejectRequest(BaseRequest):
    cmd: Literal["trust_reject"]
    target: Name


class TrustRemoveRequest(BaseRequest):
    cmd: Literal["trust_remove"]
    target: Name


class TrustListRequest(BaseRequest):
    cmd: Literal["trust_list"]


class TrustPendingRequest(BaseRequest):
    cmd: Literal["trust_pending"]


class TrustExportRequest(BaseRequest):
    cmd: Literal["trust_export"]
    target: Name
    reason: str = Field(default="", max_length=500)


class TrustImportRequest(BaseRequest):
    cmd: Literal["trust_import"]
    request: str = Field(min_length=1, max_length=8192)


class ConnectRequest(BaseRequest):
    cmd: Literal["connect"]
    target: Name
    port: Port = 1001
    timeout: Timeout = 10.0


class StreamSendRequest(PayloadRequest):
    cmd: Literal["stream_send"]
    stream: str
    quiet: bool = False  # no reply unless it fails (docs/ipc.md, Quiet sends)


class StreamReceiveRequest(BaseRequest):
    cmd: Literal["stream_receive"]
    stream: str
    timeout: Timeout | None = 30.0
    ack: bool = False
    data_frame: bool = False  # the payload in a frame of the reply, not in "data"


class StreamDrainRequest(BaseRequest):
    cmd: Literal["stream_drain"]
    stream: str
    timeout: Timeout | None = None


class StreamCloseRequest(BaseRequest):
    cmd: Literal["stream_close"]
    stream: str


class StreamAbortRequest(BaseRequest):
    cmd: Literal["stream_abort"]
    stream: str


class StreamArrivalRequest(BaseRequest):
    """About a stream of ours (``stream``) or the one a handed-out message came on
    (``message``, its id)."""

    cmd: Literal["stream_arrival"]
    stream: str | None = None
    message: str | None = None


class StreamHoldRequest(BaseRequest):
    cmd: Literal["stream_hold"]
    stream: str
    timeout: Timeout


class StreamAttachRequest(BaseRequest):
    """Makes the connection to the stream socket it is the first request on the stream's data
    socket (docs/ipc.md, Data sockets)."""

    cmd: Literal["stream_attach"]
    stream: str


class PortAttachRequest(BaseRequest):
    """Makes the connection to the stream socket it is the first request on a data socket for
    the port's messages (docs/ipc.md, A port's messages on a data socket)."""

    cmd: Literal["port_attach"]
    port: Port
    # 0: nothing is written until the client grants credit (a 'credit' frame).
    credit_messages: Annotated[int, Field(ge=0, le=MAX_CREDIT_MESSAGES)]
    credit_bytes: Annotated[int, Field(ge=0, le=MAX_CREDIT_BYTES)]
    exclusive: bool = False  # as ListenRequest's


class SendRequest(PayloadRequest):
    cmd: Literal["send"]
    target: Name
    port: Port
    timeout: Timeout = 10.0


class ListenRequest(BaseRequest):
    cmd: Literal["listen"]
    port: Port
    publish: bool = False
    # The port's messages to this listen alone: refused if the port is listened on, and any
    # other listen of it is while this one holds it (docs/ipc.md).
    exclusive: bool = False


class UnlistenRequest(BaseRequest):
    cmd: Literal["unlisten"]
    port: Port


class ReceiveRequest(BaseRequest):
    cmd: Literal["receive"]
    port: Port
    timeout: Timeout | None = 30.0
    ack: bool = False  # at-least-once: redelivered unless acknowledged with `ack` in time
    data_frame: bool = False


class DeliverRequest(BaseRequest):
    """Push the messages of a port or a stream as they arrive, while the client's credit lasts:
    one reply per message (its payload in a frame), then a last one with ``"done": true``."""

    cmd: Literal["deliver"]
    port: Port | None = None
    stream: str | None = None
    credit_messages: int = Field(default=64, ge=1, le=1 << 20)
    credit_bytes: int = Field(default=4 << 20, ge=1, le=1 << 40)
    ack: bool = False
    compact: bool = False  # each message with a compact header (docs/ipc.md, Compact headers)


class CreditRequest(BaseRequest):
    """More credit for the delivery the client started with the request ``request``."""

    cmd: Literal["credit"]
    request: RequestId
    messages: int = Field(default=0, ge=0, le=1 << 20)
    bytes: int = Field(default=0, ge=0, le=1 << 40)


class AckRequest(BaseRequest):
    cmd: Literal["ack"]
    message: str


class ReplyRequest(PayloadRequest):
    cmd: Literal["reply"]
    message: str
    quiet: bool = False  # no reply unless it fails (docs/ipc.md, Quiet sends)


class RequeueRequest(BaseRequest):
    cmd: Literal["requeue"]
    message: str


class PingRequest(BaseRequest):
    cmd: Literal["ping"]
    target: Name
    timeout: Timeout = 5.0


class CancelRequest(BaseRequest):
    cmd: Literal["cancel"]
    request: RequestId


class StopRequest(BaseRequest):
    cmd: Literal["stop"]


class ByeRequest(BaseRequest):
    """The client is closing, having answered or given back what it means to: what it was
    handed stays as it is when its connection drops (docs/ipc.md, A client that dies)."""

    cmd: Literal["bye"]


# -- daemon-hosted publishers (daemon/publishing.py): a one-shot `publish` needs a publisher that
# outlives its client.


class PublishRequest(PayloadRequest):
    cmd: Literal["publish"]
    port: Port
    topic: str = Field(max_length=MAX_TOPIC)  # characters here; the publisher checks the bytes
    overflow: Literal["block", "drop-oldest"] | None = None  # only when it creates the publisher
    timeout: Timeout | None = 10.0  # with "block": how long a full subscriber may hold it up


class PublishersRequest(BaseRequest):
    cmd: Literal["publishers"]


class UnpublishRequest(BaseRequest):
    cmd: Literal["unpublish"]
    port: Port


AnyRequest = (
    InfoRequest | PeersRequest | ResolveRequest | AddPeerRequest | TrustAddRequest
    | TrustApproveRequest | TrustRejectRequest | TrustRemoveRequest | TrustListRequest
    | TrustPendingRequest | TrustExportRequest | TrustImportRequest | ConnectRequest
    | StreamSendRequest | StreamReceiveRequest | StreamDrainRequest | StreamCloseRequest
    | StreamAbortRequest | StreamHoldRequest | StreamArrivalRequest | StreamAttachRequest
    | PortAttachRequest | SendRequest
    | ListenRequest | UnlistenRequest
    | ReceiveRequest | AckRequest | ReplyRequest | RequeueRequest | PingRequest | CancelRequest
    | StopRequest | ByeRequest
    | PublishRequest | PublishersRequest | UnpublishRequest
    | DeliverRequest | CreditRequest
)
REQUEST_ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(
    Annotated[AnyRequest, Field(discriminator="cmd")])
REQUEST_TYPES: tuple[type[BaseRequest], ...] = get_args(AnyRequest)
_COMPACT_COMMANDS: dict[int, tuple[type[StreamSendRequest] | type[ReplyRequest], str, str]] = {
    COMPACT_STREAM_SEND: (StreamSendRequest, "stream_send", "stream"),
    COMPACT_REPLY: (ReplyRequest, "reply", "message"),
}
COMMANDS: tuple[str, ...] = tuple(
    get_args(model.model_fields["cmd"].annotation)[0] for model in REQUEST_TYPES
)


# A JSON string, escapes included: what the nesting check skips (brackets in strings don't nest).
# Possessive, and one left open (or ending in a lone backslash) runs to the end: every match
# succeeds where it starts and never backtracks, so the scan is linear. (A failed match at
# every quote of a long unterminated string made it quadratic: seconds for 32 KB.)
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\[\s\S]?)*+(?:"|\Z)')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_PAIRS = (b"[]", b"{}")


def _nesting_within(body: bytes, max_depth: int) -> bool:
    """Whether ``body`` nests arrays and objects at most ``max_depth`` deep, checked without a
    recursive parser: strings removed, then innermost bracket pairs peeled off once per level."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            break
        brackets = brackets.replace(_PAIRS[0], b"").replace(_PAIRS[1], b"")
    return not brackets


def load_request_untrusted(body: bytes, max_bytes: int, max_depth: int) -> dict[str, object]:
    """The JSON object a request body holds; BadRequestError if it is none, or if it is larger
    or nested deeper than the daemon's bounds (so the parser never recurses without limit)."""
    if len(body) > max_bytes:
        raise BadRequestError(
            f"the request is {len(body)} bytes, more than the daemon's limit of {max_bytes} "
            "(send large payloads as several messages on a stream)")
    # Counting brackets is cheap; a flat header (every request the docs show) needs no more.
    if body.count(b"[") + body.count(b"{") > max_depth and not _nesting_within(body, max_depth):
        raise BadRequestError(
            f"the request nests deeper than {max_depth} levels, or its brackets do not match")
    try:
        data = json.loads(body.decode("utf-8"))  # a str: json skips guessing its encoding
    except (UnicodeDecodeError, ValueError):
        raise BadRequestError("the request is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise BadRequestError("the request must be a JSON object with a 'cmd' field")
    return data


class DataDrain(BaseModel):
    """What follows a data socket's ``drain`` kind byte (docs/ipc.md, Data sockets)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    timeout: Timeout | None = None


def load_drain_untrusted(body: bytes, max_bytes: int, max_depth: int) -> DataDrain:
    """A data socket's drain; BadRequestError naming what is wrong with it."""
    fields = load_request_untrusted(body, max_bytes, max_depth)
    try:
        return DataDrain.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadRequestError(f"bad field {where!r} in a drain: {err['msg']}") from None


def check_payload_size(frame: bytes, max_bytes: int) -> None:
    if len(frame) > max_bytes:
        raise BadRequestError(
            f"the payload is {len(frame)} bytes, more than the daemon's limit of {max_bytes}")


def load_compact_untrusted(header: bytes, payload: bytes | None, max_bytes: int,
                           max_payload: int) -> tuple[RequestId, StreamSendRequest | ReplyRequest]:
    """The request a compact header and its payload frame stand for (docs/ipc.md, Compact
    headers), and the id to answer it with; BadRequestError if they are none."""
    if len(header) > max_bytes:
        raise BadRequestError(
            f"the request is {len(header)} bytes, more than the daemon's limit of {max_bytes}")
    if len(header) < COMPACT_REQUEST.size:
        raise BadRequestError(f"a compact header is at least {COMPACT_REQUEST.size} bytes, "
                              f"not {len(header)}")
    verb, flags, number = COMPACT_REQUEST.unpack_from(header)
    if verb not in _COMPACT_COMMANDS:
        raise BadRequestError(f"unknown compact verb {verb} (see docs/ipc.md)")
    if flags & ~COMPACT_QUIET:
        raise BadRequestError(f"unknown compact flags {flags:#04x} (see docs/ipc.md)")
    try:
        about = header[COMPACT_REQUEST.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("a compact header's stream or message id is not UTF-8") from None
    quiet = bool(flags & COMPACT_QUIET)
    request_id: RequestId = f"q{number}.{about}" if quiet else number
    if payload is None:
        raise BadRequestError("a compact request needs its payload frame "
                              "(docs/ipc.md, Compact headers)")
    check_payload_size(payload, max_payload)
    model, cmd, field = _COMPACT_COMMANDS[verb]
    return request_id, model.model_validate(
        {"cmd": cmd, "id": request_id, "quiet": quiet, field: about, "data": payload})


def request_id_of(data: dict[str, object]) -> RequestId | None:
    """The id to answer with: the request's own, if it is an integer or a string."""
    raw = data.get("id")
    return raw if isinstance(raw, int | str) and not isinstance(raw, bool) else None


def validate_request_untrusted(data: dict[str, object]) -> AnyRequest:
    """The request ``data`` stands for; BadRequestError naming what is wrong with it."""
    try:
        return REQUEST_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise BadRequestError(_describe(exc, data)) from None


def _describe(exc: ValidationError, data: dict[str, object]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        cmd = data.get("cmd")
        if cmd is None:
            return "the request has no 'cmd' field"
        return f"unknown command {cmd!r} (see docs/ipc.md for the list)"
    where = ".".join(loc[1:]) if len(loc) > 1 else ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"unknown field {where!r} for command {data.get('cmd')!r}"
    if err["type"] == "missing":
        return f"command {data.get('cmd')!r} needs the field {where!r}"
    return f"bad field {where!r} for command {data.get('cmd')!r}: {err['msg']}"
