"""The ZeroMQ side: the ROUTER socket requests arrive on, the PUB socket published ports go out
on, and the loop that runs each request as its own task so a long ``receive`` never holds up
anything else.

A request is ``[identity, (empty delimiter,) header, (payload)]``: a JSON header and, for a
message, its payload as a frame of its own, so no byte of it is ever encoded or parsed
(docs/ipc.md, Framing)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import zmq

from .. import ipc
from ..errors import BadRequestError, BusyError, InternalError, PilotError
from ..ipc import encode_data
from .clients import Clients
from .datasock import Attached, DataSockets
from .dispatch import Credit, DispatchTable, Immediate, Push, Reply
from .options import DaemonOptions
from .requests import (
    AckRequest,
    AnyRequest,
    ByeRequest,
    CancelRequest,
    ConnectRequest,
    CreditRequest,
    DeliverRequest,
    ListenRequest,
    PayloadRequest,
    PortAttachRequest,
    ReplyRequest,
    RequestId,
    RequeueRequest,
    StopRequest,
    StreamAttachRequest,
    UnlistenRequest,
    check_payload_size,
    load_compact_untrusted,
    load_request_untrusted,
    request_id_of,
    validate_request_untrusted,
)

log = logging.getLogger("pilot_agents.daemon")

TaskKey = tuple[bytes, RequestId | object]  # (client identity, its request id or a fresh token)
# One encoder for every reply: json.dumps with separators builds a new one per call.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
# The first bytes of a compact request header (a JSON header starts with "{" or blank space).
_COMPACT = frozenset({bytes([ipc.COMPACT_STREAM_SEND]), bytes([ipc.COMPACT_REPLY])})
# Tuples, not unions: a union in isinstance() is built anew on every request.
_SETTLING = (ReplyRequest, RequeueRequest, AckRequest)  # see Clients.settled
_LISTENING = (ListenRequest, UnlistenRequest)
_ATTACHING = (StreamAttachRequest, PortAttachRequest)
_CONTROL = frozenset({CancelRequest, CreditRequest})  # about another request: answered at once


class IpcServer:
    def __init__(self, options: DaemonOptions, dispatch: DispatchTable,
                 undelivered: Callable[[str], bool], stop: Callable[[], None],
                 clients: Clients | None = None,
                 data_sockets: DataSockets | None = None) -> None:
        """``undelivered(message id)``: a message whose reply could not be sent goes back;
        ``stop()``: called once the reply to ``stop`` is out; ``clients``: told what each
        stream socket client holds, and when it goes away; ``data_sockets``: what attaches a
        stream or a port to a stream socket connection (none: the attach requests are refused)."""
        self.options = options
        self._clients = clients
        self._data_sockets = data_sockets
        self.home = options.home
        self.dispatch = dispatch
        self._undelivered = undelivered
        self._stop = stop
        # A plain socket, read and written without waiting (NOBLOCK) by the serve loop and the
        # handlers, which is far cheaper per message than zmq.asyncio's futures.
        self._router: zmq.Socket[bytes] | None = None
        self._readable = asyncio.Event()
        self._pub: zmq.Socket[bytes] | None = None
        # The plain unix stream socket beside the ROUTER (docs/ipc.md, The stream socket): its
        # clients by the identity they get here, which no ZeroMQ identity can be.
        self._listening: socket.socket | None = None
        self._stream_server: asyncio.AbstractServer | None = None
        self._peers: dict[bytes, _StreamPeer] = {}
        self.max_clients = options.max_clients  # what the open-file limit leaves, once bound
        self._backlog = 1  # connections its listen queue holds, once bound
        self.refused_clients = 0
        self.refused_open = 0  # refused connections not closed yet (each told why, or silent)
        self._peer_ids = itertools.count(1)
        self._tasks: dict[TaskKey, asyncio.Task[None]] = {}
        self._credits: dict[TaskKey, Credit] = {}  # the deliveries' credit, by request
        self._in_flight: collections.Counter[bytes] = collections.Counter()  # per client
        self._sending: collections.Counter[bytes] = collections.Counter()  # its sends in tasks
        self.undelivered_replies = 0

    def bind(self, address: str) -> None:
        context = ipc._zmq_context()
        router: zmq.Socket[bytes] = zmq.Socket(context, zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Per-client queues, both ways: a client that sends without reading fills its own
        # queues, never the daemon's memory. A frame too large for its bound is still read (to
        # answer it); one over twice the larger bound makes ZeroMQ drop the connection unread.
        opts = self.options
        router.setsockopt(zmq.SNDHWM, opts.client_queue_messages)
        router.setsockopt(zmq.RCVHWM, opts.client_queue_messages)
        router.setsockopt(zmq.MAXMSGSIZE,
                          2 * max(opts.max_request_bytes, opts.max_payload_bytes))
        # Publishing never waits (a PUB socket drops for slow subscribers), so it is a plain
        # socket the pumps call without awaiting.
        pub: zmq.Socket[bytes] = zmq.Socket(context, zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream_path = ipc.stream_socket_path(self.home)
        with contextlib.suppress(FileNotFoundError):
            stream_path.unlink()  # a crashed daemon's (we hold the home's lock)
        old_umask = os.umask(0o177)
        try:
            router.bind(address)
            pub.bind(ipc.pub_endpoint(self.home))
            listening.bind(str(stream_path))
        finally:
            os.umask(old_umask)
        for name in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME, ipc.STREAM_SOCKET_NAME):
            os.chmod(self.home / name, 0o600)
        self.max_clients = _client_capacity(opts.max_clients)
        self._backlog = _backlog(self.max_clients)
        listening.listen(self._backlog)
        listening.setblocking(False)
        self._router, self._pub, self._listening = router, pub, listening

    def publish(self, frames: list[bytes]) -> None:
        if self._pub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._pub.send_multipart(frames, flags=zmq.NOBLOCK)

    def close(self) -> None:
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._pub = None
        if self._stream_server is not None:
            self._stream_server.close()
        elif self._listening is not None:
            self._listening.close()
        self._stream_server = self._listening = None
        for peer in list(self._peers.values()):
            peer.transport.abort()
        with contextlib.suppress(OSError):
            ipc.stream_socket_path(self.home).unlink()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def serve(self) -> None:
        """Answer requests until cancelled. Nothing a client sends ends this loop: whatever
        goes wrong with one request is answered or logged, and the loop goes on."""
        router = self._router
        assert router is not None
        loop = asyncio.get_running_loop()
        if self._listening is not None:
            # The backlog again: asyncio listens anew, by default with 100 only.
            self._stream_server = await loop.create_unix_server(
                lambda: _StreamPeer(self), sock=self._listening, backlog=self._backlog)
        fd = cast(int, router.getsockopt(zmq.FD))
        loop.add_reader(fd, self._readable.set)
        try:
            while True:
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    # ZeroMQ's descriptor signals a change, not readiness: look at the socket's
                    # events before waiting for the next signal (a send may have taken it).
                    self._readable.clear()
                    if not _has_input(router):
                        await self._readable.wait()
                    continue
                try:
                    self._accept(frames)
                except Exception:
                    log.exception("failed to handle a request (the daemon carries on)")
                # Without this the loop would read a flood to its end before any request's
                # handler (another client's) ran.
                await asyncio.sleep(0)
        finally:
            loop.remove_reader(fd)

    def _accept(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        identity = frames[0]
        # A REQ socket puts an empty delimiter before the request (a header is never empty).
        start = 2 if frames[1] == b"" else 1
        envelope, parts = frames[1:start], frames[start:]
        request_id: RequestId | None = None
        header = parts[0] if parts else b""
        request: AnyRequest
        try:
            compact = header[:1] in _COMPACT
            if compact:
                # The payload goes into the model as it is validated: no attach afterwards.
                request_id, request = load_compact_untrusted(
                    header, parts[1] if len(parts) > 1 else None,
                    self.options.max_request_bytes, self.options.max_payload_bytes)
            else:
                data = load_request_untrusted(header, self.options.max_request_bytes,
                                              self.options.max_request_depth)
                request_id = request_id_of(data)
                request = validate_request_untrusted(data)
            if len(parts) > 2:
                raise BadRequestError(
                    f"a request is a header and at most one payload frame, not {len(parts)} "
                    "frames (docs/ipc.md, Framing)")
            if len(parts) == 2 and not compact:
                self._attach(request, parts[1])
        except BadRequestError as exc:
            log.debug("bad request: %s", exc)
            self._send(identity, envelope, ipc.error_reply(exc, request_id))
            return
        if isinstance(request, _ATTACHING):
            self._make_data_socket(identity, envelope, request_id, request)
            return
        if type(request) is ByeRequest:  # no reply: the client is closing
            if self._clients is not None and identity in self._peers:
                self._clients.leaving(identity)
            return
        if type(request) in _CONTROL:
            assert isinstance(request, CancelRequest | CreditRequest)
            reply = self._control(identity, request)
            if request_id is not None:
                reply["id"] = request_id
            self._send(identity, envelope, reply)
            return
        # .get, not the Counter's item: a missing key would call its __missing__ (Python).
        if self._in_flight.get(identity, 0) >= self.options.client_max_requests:
            self._send(identity, envelope, ipc.error_reply(BusyError(
                f"this client already has {self.options.client_max_requests} requests in "
                "flight: wait for their replies (or cancel some) first"), request_id))
            return
        key: TaskKey = (identity, request_id if request_id is not None else object())
        if key in self._tasks and not getattr(request, "quiet", False):
            # The id names its request to cancel and credit: another may not take it meanwhile.
            self._send(identity, envelope, ipc.error_reply(BadRequestError(
                f"request id {request_id!r} is in use by a request still in flight: give each "
                "request its own id (docs/ipc.md)"), request_id))
            return
        if (isinstance(request, _SETTLING) and self._clients is not None
                and identity in self._peers):
            self._clients.settled(identity, request)
        work: Awaitable[Reply]
        immediate = self.dispatch.immediate(request)
        if immediate is None:
            work = self._work(key, envelope, request_id, request)
        elif self._sending.get(identity):
            # An earlier send of this client waits in a task: this one must not overtake it.
            work = _awaited(immediate, request)
        else:
            # A send that needs no wait (the usual case) is done now: no task, no extra turn
            # of the loop before its datagram leaves.
            try:
                outcome = immediate(request)
            except Exception as exc:
                self._answer(identity, envelope, request_id, request, self._failure(request, exc))
                return
            if isinstance(outcome, dict):
                if not getattr(request, "quiet", False):  # a quiet one is answered only if it fails
                    self._answer(identity, envelope, request_id, request, {"ok": True, **outcome})
                return
            work = outcome
        task = asyncio.create_task(self._handle(key, envelope, request_id, request, work))
        self._tasks[key] = task
        self._in_flight[identity] += 1
        sending = immediate is not None
        if sending:
            self._sending[identity] += 1
        task.add_done_callback(functools.partial(self._forget_task, key, sending))

    def _make_data_socket(self, identity: bytes, envelope: list[bytes],
                          request_id: RequestId | None,
                          request: StreamAttachRequest | PortAttachRequest) -> None:
        """Make the connection a stream's or a port's data socket (docs/ipc.md, Data
        sockets); a refusal leaves it an ordinary one."""
        peer = self._peers.get(identity)
        try:
            if peer is None or peer.taken != 1 or self._data_sockets is None:
                raise BadRequestError(
                    f"'{request.cmd}' must be the first request on a new connection to the "
                    f"stream socket, {ipc.stream_socket_path(self.home)} (docs/ipc.md, Data "
                    "sockets)")
            reply, data = self._data_sockets.attach(request, peer.transport)
        except PilotError as exc:
            log.debug("%s refused: %s", request.cmd, exc)
            self._send(identity, envelope, ipc.error_reply(exc, request_id))
            return
        if request_id is not None:
            reply["id"] = request_id
        self._send(identity, envelope, reply)
        peer.attach(data)

    def _attach(self, request: AnyRequest, frame: bytes) -> None:
        if not isinstance(request, PayloadRequest):
            raise BadRequestError(f"'{request.cmd}' takes no payload frame")
        check_payload_size(frame, self.options.max_payload_bytes)
        request.attach(frame)

    def _control(self, identity: bytes, request: CancelRequest | CreditRequest) -> Reply:
        """The requests about another request of the same client, answered at once."""
        key = (identity, request.request)
        if isinstance(request, CancelRequest):
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()
            return {"ok": True, "cancelled": task is not None}
        credit = self._credits.get(key)
        if credit is not None:
            credit.grant(request.messages, request.bytes)
        return {"ok": True, "granted": credit is not None}

    def _forget_task(self, key: TaskKey, sending: bool, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:  # (else answered, and its id may be in use again)
            del self._tasks[key]
            self._credits.pop(key, None)
        identity = key[0]
        self._in_flight[identity] -= 1
        if self._in_flight[identity] <= 0:
            del self._in_flight[identity]
        if sending:
            self._sending[identity] -= 1
            if self._sending[identity] <= 0:
                del self._sending[identity]

    async def _work(self, key: TaskKey, envelope: list[bytes], request_id: RequestId | None,
                    request: AnyRequest) -> Reply:
        if self.dispatch.delivers(request):
            assert isinstance(request, DeliverRequest)
            credit = self._credits[key] = Credit(request.credit_messages, request.credit_bytes)
            push: Push = functools.partial(self._push, key[0], envelope, request_id)
            if request.compact:
                if type(request_id) is not int or not 0 <= request_id <= ipc.COMPACT_MAX_ID:
                    raise BadRequestError("a compact delivery needs an integer 'id' from 0 to "
                                          "2**64-1 (docs/ipc.md, Compact headers)")
                push = functools.partial(self._push_compact, key[0], envelope, request_id)
            return await self.dispatch.deliver(request, push, credit)
        return await self.dispatch(request)

    async def _handle(self, key: TaskKey, envelope: list[bytes],
                      request_id: RequestId | None, request: AnyRequest,
                      work: Awaitable[Reply]) -> None:
        try:
            reply = {"ok": True, **await work}
        except asyncio.CancelledError:
            return
        except Exception as exc:
            reply = self._failure(request, exc)
        # Forgotten before it is answered: the client may send its next request with the same
        # id as soon as it has the answer, before this task's done callback has run.
        self._tasks.pop(key, None)
        self._credits.pop(key, None)
        self._answer(key[0], envelope, request_id, request, reply)

    def _failure(self, request: AnyRequest, exc: Exception) -> Reply:
        if isinstance(exc, PilotError):
            return ipc.error_reply(exc)
        if isinstance(exc, OSError):
            return ipc.error_reply(PilotError(f"{exc.strerror or exc}"))
        log.exception("internal error in %r", request.cmd, exc_info=exc)
        return ipc.error_reply(InternalError(
            f"internal error in '{request.cmd}': {type(exc).__name__}: {exc} "
            f"(details in {self.home / ipc.LOG_NAME})"
        ))

    def _answer(self, identity: bytes, envelope: list[bytes], request_id: RequestId | None,
                request: AnyRequest, reply: Reply) -> None:
        if reply["ok"] and getattr(request, "quiet", False):
            return  # a quiet send is answered only if it fails
        if request_id is not None:
            reply["id"] = request_id
        if (reply["ok"] and isinstance(request, _LISTENING)
                and self._clients is not None and identity in self._peers):
            if isinstance(request, UnlistenRequest):
                self._clients.unlistened(identity, request.port)
            elif not request.publish:  # a published port outlives the command that asked
                self._clients.listened(identity, request.port)
        elif (reply["ok"] and type(request) is ConnectRequest
                and self._clients is not None and identity in self._peers):
            self._clients.connected(identity, reply["stream"])
        frames = isinstance(request, DeliverRequest) or getattr(request, "data_frame", False)
        self._send(identity, envelope, reply, frames=frames)
        if isinstance(request, StopRequest) and reply["ok"]:
            self._stop()

    def _push(self, identity: bytes, envelope: list[bytes], request_id: RequestId | None,
              reply: Reply) -> bool:
        reply = {"ok": True, **reply}
        if request_id is not None:
            reply["id"] = request_id
        if not self._send(identity, envelope, reply, frames=True, give_back=False):
            return False
        self._handed(identity, reply["message"])
        return True

    def _push_compact(self, identity: bytes, envelope: list[bytes], request_id: int,
                      reply: Reply) -> bool:
        """:meth:`_push` with a compact header (JSON for a message whose ids don't fit one)."""
        message = reply["message"]
        header = ipc.pack_message(request_id, message)
        if header is None:
            return self._push(identity, envelope, request_id, reply)
        if not self._write(identity, [identity, *envelope, header, message["data"]], None):
            return False
        self._handed(identity, message)
        return True

    def _refusal(self) -> BusyError | None:
        """Why a new stream socket connection is refused, if it is."""
        if len(self._peers) < self.max_clients:
            return None
        self.refused_clients += 1
        if self.refused_clients & (self.refused_clients - 1) == 0:  # 1, 2, 4...: no log flood
            log.warning("refused a client: %d connected (max_clients); %d refused so far",
                        len(self._peers), self.refused_clients)
        return BusyError(
            f"the daemon has {len(self._peers)} clients connected, its limit (max_clients, "
            "bounded by its open-file limit): close clients or connections you no longer use")

    def _connected(self, peer: _StreamPeer) -> bytes:
        # Nine bytes from a zero byte: ZeroMQ's own identities are five, and an application
        # may not choose one that starts with a zero byte.
        identity = b"\x00" + next(self._peer_ids).to_bytes(8, "big")
        self._peers[identity] = peer
        return identity

    def _disconnected(self, identity: bytes) -> None:
        self._peers.pop(identity, None)
        # Nobody will read what its requests still in flight answer: they end, as cancelled (a
        # delivery stops, a receive waiting for ever gives up its port).
        for key, task in list(self._tasks.items()):
            if key[0] == identity:
                task.cancel()
        if self._clients is not None:
            self._clients.gone(identity)

    def _send(self, identity: bytes, envelope: list[bytes], reply: Reply, *,
              frames: bool = False, give_back: bool = True) -> bool:
        """Send a reply without waiting; False if it could not be. A message it carries has
        its payload as bytes in ``data``: sent as a frame of its own with ``frames``, else as
        the JSON ``data`` and ``encoding`` fields; ``give_back``: one that could not be sent
        goes back to its inbox (a delivery does that itself)."""
        parts = [identity, *envelope, b""]
        message = reply.get("message")
        if isinstance(message, dict) and isinstance(message.get("data"), bytes):
            if frames:
                parts.append(message.pop("data"))
            else:
                message["data"], message["encoding"] = encode_data(message["data"])
        parts[len(envelope) + 1] = _encode_json(reply).encode("utf-8")
        return self._write(identity, parts, message if give_back else None)

    def _handed(self, identity: bytes, message: dict[str, object]) -> None:
        """A delivery pushed a message to a stream socket client (the only clients the daemon
        hears go away): the client owes its sender an answer. Only a delivery's: a consumer
        that stays connected. A ``receive``'s caller may hang up before the reply is sent, by
        another client, as the SDK's one-shot ``receive`` does."""
        if self._clients is not None and identity in self._peers:
            self._clients.handed(identity, str(message["id"]))

    def _write(self, identity: bytes, parts: list[bytes], message: object) -> bool:
        """Send ``[identity, *envelope, header, (payload)]`` without waiting; False if it
        could not be, and then ``message``, a dict with its id, goes back to its inbox."""
        peer = self._peers.get(identity) if len(identity) == 9 else None
        if peer is not None:
            if peer.write(parts[1:], self.options.max_payload_bytes):
                return True
            self._not_sent(zmq.ZMQError(zmq.EAGAIN, "the client does not read its replies"),
                           message)
            return False
        assert self._router is not None
        try:
            self._router.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._not_sent(exc, message)
            return False
        finally:
            # Sending may have consumed the signal of a request that arrived meanwhile.
            if _has_input(self._router):
                self._readable.set()
        return True

    def _not_sent(self, exc: zmq.ZMQError, message: object) -> None:
        # The client is gone, or its queue is full because it does not read: a message the
        # reply carried goes back to its inbox. Counted, not logged one by one (a flood would
        # fill the log).
        self.undelivered_replies += 1
        log.debug("reply not delivered (%s)", exc)
        if isinstance(message, dict):
            self._undelivered(str(message.get("id")))


async def _awaited(immediate: Immediate, request: AnyRequest) -> Reply:
    outcome = immediate(request)
    return outcome if isinstance(outcome, dict) else await outcome


def _has_input(sock: zmq.Socket[bytes]) -> bool:
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


# Open files the daemon keeps for itself beyond its clients: its UDP and ZeroMQ sockets,
# ZeroMQ's own, the log, the spool and the trust store, a metrics connection or two.
RESERVED_FILES = 256
REFUSED_WAIT = 5.0  # seconds a refused connection may take to send the request it is told on
SOMAXCONN = "/proc/sys/net/core/somaxconn"  # the kernel's cap on a listen queue
MAX_REFUSED_OPEN = 64  # refused connections held open (to be told why) at once; well in reserve


def _client_capacity(wanted: int) -> int:
    """``wanted``, or fewer if the open-file limit leaves fewer; the soft limit is raised
    toward the hard one first (a limit of 1024, common, would allow few data sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - RESERVED_FILES))


def _backlog(max_clients: int) -> int:
    """Connections the stream socket's listen queue holds: as many as may be open at once, as
    far as the kernel allows (net.core.somaxconn caps it). A connection past a full queue is
    refused (EAGAIN), which a burst of clients starting at once would otherwise meet."""
    try:
        cap = int(Path(SOMAXCONN).read_text())
    except (OSError, ValueError):
        cap = socket.SOMAXCONN
    return max(1, min(max_clients, cap))


def _request_id_untrusted(header: bytes, options: DaemonOptions) -> RequestId | None:
    """The id of a JSON request, so that a refusal can answer it; None if it has none."""
    with contextlib.suppress(BadRequestError):
        if header[:1] not in _COMPACT:
            return request_id_of(load_request_untrusted(
                header, options.max_request_bytes, options.max_request_depth))
    return None


class _StreamPeer(asyncio.Protocol):
    """One client on the stream socket: frames in and out as ``ipc.pack_frames`` lays them."""

    def __init__(self, server: IpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.identity = b""
        opts = server.options
        self._reader = ipc.FrameReader(2 * max(opts.max_request_bytes, opts.max_payload_bytes))
        self._pending: collections.deque[list[bytes]] = collections.deque()
        self.taken = 0  # requests taken: 'stream_attach' must be the first
        self._data: Attached | None = None  # once the connection is a data socket
        self._refused: BusyError | None = None  # over max_clients: told so, then closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._refused = self.server._refusal()
        if self._refused is not None:
            self.server.refused_open += 1  # (less one in connection_lost, however it closes)
            if self.server.refused_open > MAX_REFUSED_OPEN:
                # A flood: closed untold, or refused connections would take the files the
                # limit keeps for the daemon.
                self.transport.abort()
                return
            # Told at its first request (which is what a client waits on), else closed.
            asyncio.get_running_loop().call_later(REFUSED_WAIT, self.transport.close)
            return
        self.identity = self.server._connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused is not None:
            self.server.refused_open -= 1
            return
        if self._data is not None:
            self._data.lost()
        self.server._disconnected(self.identity)

    def _refuse(self, frames: list[bytes], refusal: BusyError) -> None:
        request_id = _request_id_untrusted(frames[0], self.server.options) if frames else None
        reply = _encode_json(ipc.error_reply(refusal, request_id)).encode("utf-8")
        self.transport.writelines(ipc.pack_frames([reply]))
        self.transport.close()  # after what is written

    def pause_writing(self) -> None:
        if self._data is not None:
            self._data.pause_writing()

    def resume_writing(self) -> None:
        if self._data is not None:
            self._data.resume_writing()

    def attach(self, data: Attached) -> None:
        """From now on the connection is a data socket: what is read goes to it, and
        it decides when to read (the messages read but not yet taken are its first)."""
        self._data = data
        pending = list(self._pending)
        self._pending.clear()
        data.start(pending)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ipc.FramingError as exc:
            log.debug("stream client dropped: %s", exc)
            self.transport.abort()
            return
        if self._data is not None:
            # A data socket's messages are stream writes, no requests: all taken at once.
            self._data.received(messages)
            return
        if not messages:
            return
        if self._refused is not None:
            if not self.transport.is_closing():
                self._refuse(messages[0], self._refused)
            return
        if len(messages) == 1 and not self._pending:  # the usual case: handled now
            self._take(messages[0])
            return
        # One request per turn of the loop, as the ROUTER is read: each request's task gets to
        # run before the next is taken (and a flood waits in the client's socket).
        self._pending.extend(messages)
        self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        if not self._pending:
            return
        self._take(self._pending.popleft())
        if self._pending:
            asyncio.get_running_loop().call_soon(self._next)
        elif self._data is None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _take(self, frames: list[bytes]) -> None:
        self.taken += 1
        try:
            self.server._accept([self.identity, *frames])
        except Exception:
            log.exception("failed to handle a request (the daemon carries on)")

    def write(self, frames: list[bytes], limit: int) -> bool:
        """Queue a reply; False if the client has more than ``limit`` bytes unread already
        (or is gone), as a full ZeroMQ queue refuses one."""
        if self.transport.is_closing() or self.transport.get_write_buffer_size() > limit:
            return False
        self.transport.writelines(ipc.pack_frames(frames))
        return True
