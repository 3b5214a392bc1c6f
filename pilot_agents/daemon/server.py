"""The ZeroMQ side: the ROUTER socket requests arrive on, the PUB socket published ports go out
on, and the loop that runs each request as its own task so a long ``receive`` never holds up
anything else."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from .. import ipc
from ..errors import BadRequestError, BusyError, InternalError, PilotError
from .dispatch import DispatchTable, Reply
from .options import DaemonOptions
from .requests import (
    AnyRequest,
    CancelRequest,
    RequestId,
    StopRequest,
    load_request_untrusted,
    request_id_of,
    validate_request_untrusted,
)

log = logging.getLogger("pilot_agents.daemon")

TaskKey = tuple[bytes, RequestId | object]  # (client identity, its request id or a fresh token)


class IpcServer:
    def __init__(self, options: DaemonOptions, dispatch: DispatchTable,
                 undelivered: Callable[[str], Awaitable[bool]],
                 stop: Callable[[], None]) -> None:
        """``undelivered(message id)``: a message whose reply could not be sent goes back;
        ``stop()``: called once the reply to ``stop`` is out."""
        self.options = options
        self.home = options.home
        self.dispatch = dispatch
        self._undelivered = undelivered
        self._stop = stop
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._tasks: dict[TaskKey, asyncio.Task[None]] = {}
        self._in_flight: collections.Counter[bytes] = collections.Counter()  # per client
        self.undelivered_replies = 0

    def bind(self, address: str) -> None:
        context = ipc._zmq_context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Per-client queues, both ways: a client that sends without reading fills its own
        # queues, never the daemon's memory. A request too large for max_request_bytes is still
        # read (to answer it); one over twice that makes ZeroMQ drop the connection unread.
        opts = self.options
        router.setsockopt(zmq.SNDHWM, opts.client_queue_messages)
        router.setsockopt(zmq.RCVHWM, opts.client_queue_messages)
        router.setsockopt(zmq.MAXMSGSIZE, 2 * opts.max_request_bytes)
        # Publishing never waits (a PUB socket drops for slow subscribers), so it is a plain
        # socket the pumps call without awaiting.
        pub: zmq.Socket[bytes] = zmq.Socket(context, zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        old_umask = os.umask(0o177)
        try:
            router.bind(address)
            pub.bind(ipc.pub_endpoint(self.home))
        finally:
            os.umask(old_umask)
        for name in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME):
            os.chmod(self.home / name, 0o600)
        self._router, self._pub = router, pub

    def publish(self, frames: list[bytes]) -> None:
        if self._pub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._pub.send_multipart(frames, flags=zmq.NOBLOCK)

    def close(self) -> None:
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._pub = None

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def serve(self) -> None:
        """Answer requests until cancelled. Nothing a client sends ends this loop: whatever
        goes wrong with one request is answered or logged, and the loop goes on."""
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            try:
                await self._accept(frames)
            except Exception:
                log.exception("failed to handle a request (the daemon carries on)")
            # recv returns at once while requests are queued: without this the loop would
            # read a flood to its end before any request's handler (another client's) ran.
            await asyncio.sleep(0)

    async def _accept(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        identity, envelope, body = frames[0], frames[1:-1], frames[-1]
        request_id: RequestId | None = None
        try:
            data = load_request_untrusted(body, self.options.max_request_bytes,
                                          self.options.max_request_depth)
            request_id = request_id_of(data)
            request = validate_request_untrusted(data)
        except BadRequestError as exc:
            log.debug("bad request: %s", exc)
            await self._send(identity, envelope, ipc.error_reply(exc, request_id))
            return
        if isinstance(request, CancelRequest):
            task = self._tasks.get((identity, request.request))
            if task is not None:
                task.cancel()
            await self._send(identity, envelope, {"ok": True, "cancelled": task is not None})
            return
        if self._in_flight[identity] >= self.options.client_max_requests:
            await self._send(identity, envelope, ipc.error_reply(BusyError(
                f"this client already has {self.options.client_max_requests} requests in "
                "flight: wait for their replies (or cancel some) first"), request_id))
            return
        key: TaskKey = (identity, request_id if request_id is not None else object())
        task = asyncio.create_task(self._handle(identity, envelope, request_id, request))
        self._tasks[key] = task
        self._in_flight[identity] += 1
        task.add_done_callback(functools.partial(self._forget_task, key))

    def _forget_task(self, key: TaskKey, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        identity = key[0]
        self._in_flight[identity] -= 1
        if self._in_flight[identity] <= 0:
            del self._in_flight[identity]

    async def _handle(self, identity: bytes, envelope: list[bytes],
                      request_id: RequestId | None, request: AnyRequest) -> None:
        try:
            reply = {"ok": True, **await self.dispatch(request)}
        except asyncio.CancelledError:
            return
        except PilotError as exc:
            reply = ipc.error_reply(exc)
        except OSError as exc:
            reply = ipc.error_reply(PilotError(f"{exc.strerror or exc}"))
        except Exception as exc:
            log.exception("internal error in %r", request.cmd)
            reply = ipc.error_reply(InternalError(
                f"internal error in '{request.cmd}': {type(exc).__name__}: {exc} "
                f"(details in {self.home / ipc.LOG_NAME})"
            ))
        if request_id is not None:
            reply["id"] = request_id
        await self._send(identity, envelope, reply)
        if isinstance(request, StopRequest) and reply["ok"]:
            self._stop()

    async def _send(self, identity: bytes, envelope: list[bytes], reply: Reply) -> None:
        assert self._router is not None
        body = json.dumps(reply, separators=(",", ":")).encode("utf-8")
        try:
            await self._router.send_multipart([identity, *envelope, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # The client is gone, or its queue is full because it does not read: a message
            # the reply carried goes back to its inbox. Counted, not logged one by one (a
            # flood would fill the log).
            self.undelivered_replies += 1
            log.debug("reply not delivered (%s)", exc)
            message = reply.get("message")
            if isinstance(message, dict):
                await self._undelivered(str(message.get("id")))
