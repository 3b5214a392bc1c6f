"""Request/reply (pilot_agents.patterns.reqrep) on both transports."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pilot_agents import Client, Node, PilotTimeoutError
from pilot_agents.errors import (
    ConfigError,
    ConnectionClosedError,
    PilotError,
    PortClosedError,
    RemoteError,
    WireError,
)
from pilot_agents.patterns import Replier, ReqRepConfig, Request, Requester, reqrep, serving
from pilot_agents.patterns.frames import MAX_MESSAGE, Kind, encode_frame, parse_frame_untrusted
from pilot_agents.patterns.reqrep import Reply
from tests.conftest import DaemonHandle, stop_daemons
from tests.datasock_helpers import started
from tests.test_node import server_and_two_clients
from tests.transport_pairs import Pair, kind_fixture, pair_fixture  # noqa: F401 (fixtures)

log = logging.getLogger("tests.reqrep")


async def echo(request: Request) -> object:
    return {"echo": request.json(), "from": request.sender}


def slow_until_cancelled() -> tuple[Callable[[Request], Awaitable[object]], asyncio.Event,
                                    asyncio.Event]:
    """A handler that echoes, except a request of b"slow", which runs until cancelled; and
    the events it sets then: started, cancelled."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> object:
        if request.data == b"slow":
            started.set()
            try:
                await asyncio.sleep(300)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return request.data

    return handler, started, cancelled


async def test_a_request_gets_its_reply(pair: Pair) -> None:
    async with (
        serving(pair.server.transport, 7001, echo),
        Requester(pair.client.transport) as requester,
    ):
        reply = await requester.request(pair.server_name, 7001, {"q": 1}, timeout=10)
        assert reply.json() == {"echo": {"q": 1}, "from": pair.client.node_id}
        assert reply.sender == pair.server.node_id


async def test_1000_concurrent_requests_on_one_tunnel_come_back_matched(
        pair: Pair, kind: str) -> None:
    async def slow_echo(request: Request) -> object:
        n = request.json()["n"]
        await asyncio.sleep(0.001 * (n % 7))  # answers come back out of order
        return {"n": n, "from": request.sender}

    async with (
        serving(pair.server.transport, 7002, slow_echo),
        Requester(pair.client.transport) as requester,
    ):
        started = time.perf_counter()
        replies = await asyncio.gather(*(
            requester.request(pair.server_name, 7002, {"n": n}, timeout=60)
            for n in range(1000)))
        elapsed = time.perf_counter() - started
        assert [r.json() for r in replies] == [
            {"n": n, "from": pair.client.node_id} for n in range(1000)]
        log.warning("1000 concurrent requests (%s): %.2f s", kind, elapsed)


async def test_requests_beyond_max_in_flight_wait_their_turn(pair: Pair) -> None:
    busy = peak = 0

    async def slow_echo(request: Request) -> object:
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        await asyncio.sleep(0.05)
        busy -= 1
        return request.data

    config = ReqRepConfig(streams_per_peer=1, max_in_flight=2)
    async with (
        serving(pair.server.transport, 7008, slow_echo),
        Requester(pair.client.transport, config) as requester,
    ):
        replies = await asyncio.gather(*(
            requester.request(pair.server_name, 7008, str(n), timeout=30) for n in range(12)))
        assert [r.text() for r in replies] == [str(n) for n in range(12)]
        assert peak == 2


@contextlib.asynccontextmanager
async def one_stream_held(
        pair: Pair, port: int, answers: dict[str, object] | None = None,
) -> AsyncIterator[tuple[Requester, asyncio.Event, asyncio.Task[Reply]]]:
    """A requester with one stream to ``port``, on which the request "slow" waits for its reply
    until the event is set; another request is answered with ``answers[its text]``, or its
    text."""
    release = asyncio.Event()

    async def handler(request: Request) -> object:
        if request.text() == "slow":
            await release.wait()
        return (answers or {}).get(request.text(), request.text())

    async with (
        serving(pair.server.transport, port, handler),
        Requester(pair.client.transport, ReqRepConfig(streams_per_peer=1)) as requester,
    ):
        slow = asyncio.create_task(requester.request(pair.server_name, port, "slow", timeout=30))
        await asyncio.sleep(0.2)
        yield requester, release, slow


async def test_a_slow_request_does_not_hold_up_a_fast_one(pair: Pair) -> None:
    async with one_stream_held(pair, 7003) as (requester, release, slow):
        fast = await requester.request(pair.server_name, 7003, "fast", timeout=5)
        assert fast.text() == "fast" and not slow.done()
        release.set()
        assert (await slow).text() == "slow"


async def test_a_handler_runs_as_its_worker_task_from_its_first_step(pair: Pair) -> None:
    """serve() runs a request's first step as soon as it is delivered (embedded: in the
    delivery itself, serve()'s eager start): as one task throughout, in that task's context,
    so a timeout armed before the handler's first wait fires, cancels only it, and context
    variables set before it are there after it; a second wait the same."""
    seen: contextvars.ContextVar[bytes] = contextvars.ContextVar("seen")

    async def handler(request: Request) -> object:
        seen.set(request.data)
        me = asyncio.current_task()
        assert me is not None
        waits = []
        for _ in range(2):
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.sleep(10)
            except TimeoutError:
                waits.append("timed out")
        assert asyncio.current_task() is me and not me.cancelling()
        return {"seen": seen.get().decode(), "waits": waits}

    async with (
        serving(pair.server.transport, 7003, handler),
        Requester(pair.client.transport) as requester,
    ):
        replies = await asyncio.gather(*(
            requester.request(pair.server_name, 7003, f"r{n}", timeout=10) for n in range(3)))
        assert [reply.json() for reply in replies] == [
            {"seen": f"r{n}", "waits": ["timed out", "timed out"]} for n in range(3)]


async def test_a_handler_that_cancels_itself_before_its_first_wait_is_interrupted(
        pair: Pair) -> None:
    """As in any task: a timeout already spent, or the handler's own cancel, interrupts its
    first wait (started in the delivery, the cancel lands on its worker's idle wait first)."""
    async def spent_budget(request: Request) -> object:
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(30)
        except TimeoutError:
            return "timed out"
        return "slept"

    async def cancels_itself(request: Request) -> object:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            task.uncancel()
            return "cancelled"
        return "slept"

    async with (
        serving(pair.server.transport, 7004, spent_budget),
        serving(pair.server.transport, 7005, cancels_itself),
        Requester(pair.client.transport) as requester,
    ):
        assert (await requester.request(pair.server_name, 7004, "x", timeout=10)).text() == (
            "timed out")
        assert (await requester.request(pair.server_name, 7005, "x", timeout=10)).text() == (
            "cancelled")


@contextlib.asynccontextmanager
async def given_up(pair: Pair, port: int, handler: Callable[[Request], Awaitable[object]],
                   data: bytes = b"x") -> AsyncIterator[Requester]:
    """``handler`` served on ``port``, and a request to it its requester gave up on (a 0.1 s
    timeout); the requester, for more."""
    async with (
        serving(pair.server.transport, port, handler),
        Requester(pair.client.transport) as requester,
    ):
        with pytest.raises(PilotTimeoutError):
            await requester.request(pair.server_name, port, data, timeout=0.1)
        yield requester


async def test_a_handler_keeps_the_on_cancel_callback_it_sets(pair: Pair) -> None:
    """Request.on_cancel set in a handler's first step replaces serve()'s (cancel the
    handler), and is called when its requester gives up; the handler runs on."""
    seen: list[str] = []
    finished = asyncio.Event()

    async def handler(request: Request) -> object:
        request.on_cancel(lambda: seen.append("given up"))
        await asyncio.sleep(0.5)
        finished.set()
        return "late"

    async with given_up(pair, 7006, handler):
        await asyncio.wait_for(finished.wait(), 10)
        assert seen == ["given up"]


async def test_an_on_cancel_callback_that_raises_is_logged_and_the_replier_goes_on(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> object:
        if request.data == b"slow":
            def broken() -> None:
                raise RuntimeError("a bug in the callback")

            request.on_cancel(broken)
            await asyncio.sleep(1)
        return "ok"

    async with given_up(pair, 7007, handler, b"slow") as requester:
        for _ in range(100):
            if "on_cancel callback of request" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "on_cancel callback of request" in caplog.text
        assert (await requester.request(pair.server_name, 7007, "x", timeout=10)).text() == "ok"


async def test_serve_stopped_as_a_request_starts_cancels_its_handler(pair: Pair) -> None:
    """A request whose handler stops serve() in its first step (a "shutdown" request), before
    its worker took it over: the handler is cancelled where it waits, and its cleanup runs."""
    events: list[str] = []
    serve_task: asyncio.Task[None] | None = None

    async def handler(request: Request) -> object:
        assert serve_task is not None
        serve_task.cancel()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        return "slept"

    serve_task = asyncio.create_task(reqrep.serve(pair.server.transport, 7008, handler))
    await asyncio.sleep(0.2)
    async with Requester(pair.client.transport) as requester:
        with pytest.raises(RemoteError, match="closed before answering"):
            await requester.request(pair.server_name, 7008, "stop", timeout=10)
    with pytest.raises(asyncio.CancelledError):
        await serve_task
    assert events == ["cancelled"]


async def test_serve_stops_while_a_given_up_request_still_runs(pair: Pair) -> None:
    """A handler that chose to finish a request its requester gave up on (its own on_cancel)
    does not keep serve() from stopping: the stop's cancel is not taken for the request's."""
    async def handler(request: Request) -> object:
        await asyncio.sleep(0)  # (in its task, on either transport)
        request.on_cancel(lambda: None)
        await asyncio.sleep(30)
        return "done"

    async with Requester(pair.client.transport) as requester:
        serving_it = serving(pair.server.transport, 7009, handler)
        await serving_it.__aenter__()
        with pytest.raises(PilotTimeoutError):
            await requester.request(pair.server_name, 7009, "x", timeout=0.1)
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(serving_it.__aexit__(None, None, None))
        done, _ = await asyncio.wait([stopping], timeout=5)
        assert done, "serving() did not stop"
        stopping.result()


async def test_serving_passes_on_a_cancel_that_comes_while_it_stops(pair: Pair) -> None:
    """serving() waits for serve() to end on its way out; a cancel of the task that waits is
    that task's, not to be swallowed with serve()'s own."""
    gate = asyncio.Event()

    async def handler(request: Request) -> object:
        while not gate.is_set():  # a handler that does not stop when told to
            with contextlib.suppress(asyncio.CancelledError):
                await gate.wait()
        return "done"

    async def serve_a_request() -> None:
        async with serving(pair.server.transport, 7010, handler), \
                Requester(pair.client.transport) as requester:
            with contextlib.suppress(PilotTimeoutError):
                await requester.request(pair.server_name, 7010, "x", timeout=0.2)

    outer = asyncio.create_task(serve_a_request())
    await asyncio.sleep(0.5)  # in serving()'s way out, waiting for the handler to end
    outer.cancel()
    gate.set()
    done, _ = await asyncio.wait([outer], timeout=10)
    assert done, "serving() did not stop"
    with pytest.raises(asyncio.CancelledError):
        outer.result()


async def test_a_handler_that_raises_is_a_remote_error(pair: Pair) -> None:
    async def handler(request: Request) -> object:
        raise ValueError("no such table: sales")

    async with (
        serving(pair.server.transport, 7004, handler),
        Requester(pair.client.transport) as requester,
    ):
        with pytest.raises(RemoteError, match="ValueError: no such table: sales") as info:
            await requester.request(pair.server_name, 7004, "x", timeout=10)
        assert info.value.remote_type == "ValueError"
        # The stream survives an error reply.
        with pytest.raises(RemoteError):
            await requester.request(pair.server_name, 7004, "y", timeout=10)


async def test_no_reply_in_time_is_a_timeout(pair: Pair) -> None:
    async with Replier(pair.server.transport, 7005) as replier, \
            Requester(pair.client.transport) as requester:
        with pytest.raises(PilotTimeoutError, match="no reply"):
            await requester.request(pair.server_name, 7005, "anyone?", timeout=0.5)
        request = await replier.receive(timeout=5)
        assert request.text() == "anyone?"
        await request.reply("too late")  # dropped by the requester, which gave up


async def test_timeouts_share_a_timer_yet_each_request_keeps_its_own(pair: Pair) -> None:
    """A long deadline armed first, then shorter ones: each short one still times out on time,
    the long one still gets its late reply, and a caller's own cancel stays a cancel."""
    async with Replier(pair.server.transport, 7007) as replier, \
            Requester(pair.client.transport) as requester:
        patient = asyncio.create_task(
            requester.request(pair.server_name, 7007, "patient", timeout=30))
        cancelled = asyncio.create_task(
            requester.request(pair.server_name, 7007, "cancelled", timeout=30))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        for timeout in (0.6, 0.3):
            started = time.monotonic()
            with pytest.raises(PilotTimeoutError, match="no reply"):
                await requester.request(pair.server_name, 7007, "hasty", timeout=timeout)
            assert timeout <= time.monotonic() - started < timeout + 2
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        requests = {(r := await replier.receive(timeout=5)).text(): r for _ in range(4)}
        await requests["patient"].reply("late but in time")
        assert (await asyncio.wait_for(patient, 10)).text() == "late but in time"


async def test_a_replier_that_goes_away_mid_request_fails_the_requester(pair: Pair) -> None:
    async with Requester(pair.client.transport) as requester:
        replier = Replier(pair.server.transport, 7006)
        await replier.__aenter__()
        waiting = asyncio.create_task(
            requester.request(pair.server_name, 7006, "hello?", timeout=30))
        request = await replier.receive(timeout=5)
        assert request.text() == "hello?"
        await replier.close()
        with pytest.raises(PilotError):
            await asyncio.wait_for(waiting, 15)


async def test_malformed_frames_from_a_trusted_peer_are_dropped(pair: Pair) -> None:
    async with serving(pair.server.transport, 7007, echo):
        # Garbage straight onto the port, then a real request: the replier goes on.
        for junk in (b"", b"\x01", b"\x09" + bytes(8), encode_frame(Kind.REPLY, 1, b"x"),
                     encode_frame(Kind.CANCEL, 12345, b"")):  # a request nobody knows
            await pair.client.transport.send(pair.server_name, 7007, junk, timeout=10)
        async with Requester(pair.client.transport) as requester:
            reply = await requester.request(pair.server_name, 7007, [1], timeout=10)
            assert reply.json()["echo"] == [1]


def test_an_idle_timeout_must_be_a_positive_number_of_seconds() -> None:
    for idle_timeout in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="idle_timeout"):
            ReqRepConfig(idle_timeout=idle_timeout)


def test_frame_parsing_raises_only_wire_errors() -> None:
    for data in (b"", b"\x01" * 8, b"\xff" + bytes(8)):
        with pytest.raises(WireError):
            parse_frame_untrusted(data)
    frame = parse_frame_untrusted(encode_frame(Kind.REQUEST, 2**64 - 1, b"body"))
    assert (frame.kind, frame.id, frame.payload) == (Kind.REQUEST, 2**64 - 1, b"body")


async def test_a_stream_opened_after_close_is_aborted_not_kept() -> None:
    """close() while requests open their stream (a resend after a restart does): the stream,
    once open, is aborted, and each request raises that the requester was closed; the one
    that waited for the first to open it opens none after close() (it did, and kept it)."""
    opened: list[object] = []
    aborted: list[object] = []
    gate = asyncio.Event()

    class SlowConnection:
        async def __aenter__(self) -> SlowConnection:
            await gate.wait()
            opened.append(self)
            return self

        async def abort(self) -> None:
            aborted.append(self)

    class SlowTransport:
        def connect(self, peer: str, port: int, timeout: float = 10.0) -> SlowConnection:
            return SlowConnection()

    requester = Requester(SlowTransport(), None)  # type: ignore[arg-type]
    requests = [asyncio.create_task(requester.request("beta", 1, b"x", timeout=5))
                for _ in range(2)]
    await asyncio.sleep(0.05)
    await requester.close()
    gate.set()
    for request in requests:
        with pytest.raises(ConnectionClosedError, match="requester was closed"):
            await request
    assert opened and aborted == opened
    assert not requester._streams


async def test_a_request_waiting_for_its_turn_at_close_fails_unsent(pair: Pair) -> None:
    """close() fails the request in flight; the one waiting behind it for a slot
    (max_in_flight) fails too. It used to open a new stream after close(), keep it, and send
    the request on it, to time out there."""
    config = ReqRepConfig(streams_per_peer=1, max_in_flight=1)
    async with Replier(pair.server.transport, 7024) as replier:
        requester = Requester(pair.client.transport, config)
        first = asyncio.create_task(
            requester.request(pair.server_name, 7024, "first", timeout=5))
        await replier.receive(timeout=10)
        second = asyncio.create_task(
            requester.request(pair.server_name, 7024, "second", timeout=5))
        await asyncio.sleep(0.3)  # the second waits for the only slot
        assert not second.done()
        await requester.close()
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert [type(result) for result in results] == [ConnectionClosedError] * 2, results
        with pytest.raises(PilotTimeoutError):  # the second was never sent
            await replier.receive(timeout=0.5)
        assert not requester._streams


async def test_cancelling_a_request_and_the_one_waiting_for_its_slot_cancels_both(
        pair: Pair) -> None:
    """As gather() and TaskGroup cancel their children: the request holding the only slot,
    then the one waiting for it, in one step. The second raised ValueError: the first's
    release had already taken its (cancelled) turn off the queue."""
    config = ReqRepConfig(streams_per_peer=1, max_in_flight=1)
    async with (
        Replier(pair.server.transport, 7025) as replier,
        Requester(pair.client.transport, config) as requester,
    ):
        holder = asyncio.create_task(
            requester.request(pair.server_name, 7025, "first", timeout=30))
        await replier.receive(timeout=10)
        waiter = asyncio.create_task(
            requester.request(pair.server_name, 7025, "second", timeout=30))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        holder.cancel()
        waiter.cancel()
        results = await asyncio.gather(holder, waiter, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results), results


async def test_a_released_slot_goes_to_the_request_waiting_for_it() -> None:
    """A request that comes between a slot's release and the woken request's step used to
    take the slot first (the count said it was free), sending the woken one to the back."""
    stream = reqrep._Stream(object(), "peer", 1, max_in_flight=1, now=0.0)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    await stream.take_slot(loop)
    waiting = asyncio.create_task(stream.take_slot(loop))
    await asyncio.sleep(0)
    stream.release_slot()
    # What a request starting in this step sees (Requester.request takes a free slot without
    # waiting): none free, the woken one's.
    assert stream.in_flight == stream.max_in_flight
    late = asyncio.create_task(stream.take_slot(loop))
    await asyncio.sleep(0)
    assert waiting.done() and not late.done()
    assert stream.in_flight == 1 and len(stream.turns) == 1
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    stream.release_slot()
    assert stream.in_flight == 0 and not stream.turns


async def test_a_cancelled_replier_close_leaves_no_answer_behind() -> None:
    """close() cancelled while it waited for its error answers left them running, each
    waiting for room for as long as its requester does not read, and the listener open."""
    closed = asyncio.Event()
    stuck = asyncio.Event()

    class Listener:
        async def __aenter__(self) -> Listener:
            return self

        async def close(self) -> None:
            closed.set()

    class StuckMessage:  # a way back that never has room
        sender, source_port = "peer", 1

        async def reply(self, data: bytes, *, stall: float | None = None) -> None:
            await stuck.wait()

    class OneListener:
        def listen(self, port: int) -> Listener:
            return Listener()

    replier = Replier(OneListener(), 1)  # type: ignore[arg-type]
    await replier.__aenter__()
    for request_id in range(3):
        request = Request(b"", "peer", 1, request_id, StuckMessage(), replier)  # type: ignore[arg-type]
        replier._unanswered[("peer", 1, request_id)] = request
    before = asyncio.all_tasks()
    closing = asyncio.create_task(replier.close())
    await asyncio.sleep(0.1)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.sleep(0)
    assert not [task for task in asyncio.all_tasks() - before if not task.done()]
    assert closed.is_set()


async def test_a_replier_closes_in_time_when_a_requester_does_not_read(pair: Pair) -> None:
    """close() answers each request it handed out with an error. To a requester that stopped
    reading, with its stream full of replies, that answer waited for room for ever, and so did
    close() (and the end of serving())."""
    async with Replier(pair.server.transport, 7026) as replier:
        conn = pair.client.transport.connect(pair.server_name, 7026)
        await conn.__aenter__()  # a requester that sends and never reads
        try:
            for request_id in range(1, 5):
                await conn.send(encode_frame(Kind.REQUEST, request_id, b"big, please"))
            replying = []
            for _ in range(3):
                request = await replier.receive(timeout=10)
                replying.append(asyncio.create_task(request.reply(b"x" * (40 * 2**20))))
            unanswered = await replier.receive(timeout=10)
            await asyncio.sleep(1.0)
            try:
                await asyncio.wait_for(replier.close(), reqrep.CANCEL_WAIT + 5)
            finally:
                for task in replying:
                    task.cancel()
                await asyncio.gather(*replying, return_exceptions=True)
            assert unanswered.answered
        finally:
            await conn.abort()


async def test_a_request_or_reply_that_cannot_be_sent_fails_alone(pair: Pair) -> None:
    """A request larger than a tunnel message is the caller's mistake, said at once; a handler's
    return value that is not bytes, str or JSON, or is larger than a tunnel message, reaches its
    requester as a RemoteError saying so, at once. Sent, such a frame reset the stream others
    wait on (or had the daemon refuse it, and the stream was dropped): they failed with it, and
    an unsendable reply was never answered, its requester waiting for its timeout."""
    answers = {"object": object(), "huge": b"x" * (MAX_MESSAGE + 1)}
    async with one_stream_held(pair, 7010, answers) as (requester, release, slow):
        with pytest.raises(ConfigError, match="largest message"):
            await requester.request(pair.server_name, 7010, answers["huge"], timeout=20)
        with pytest.raises(RemoteError, match="cannot send object") as info:
            await requester.request(pair.server_name, 7010, "object", timeout=20)
        assert info.value.remote_type == "ConfigError"
        with pytest.raises(RemoteError, match="largest message"):
            await requester.request(pair.server_name, 7010, "huge", timeout=20)
        release.set()
        assert (await slow).text() == "slow"


async def test_a_request_its_requester_gave_up_on_is_cancelled_at_the_replier(
        pair: Pair) -> None:
    """A timed-out request (a long model call, say) ran on at the replier, holding one of its
    handler slots with nobody to read the answer. The requester's CANCEL now stops it, also
    when every handler slot is busy (one here), and the slot serves the next request."""
    handler, _, cancelled = slow_until_cancelled()
    config = ReqRepConfig(handler_concurrency=1)
    async with (
        serving(pair.server.transport, 7020, handler, config) as replier,
        Requester(pair.client.transport) as requester,
    ):
        with pytest.raises(PilotTimeoutError):
            await requester.request(pair.server_name, 7020, b"slow", timeout=1)
        await asyncio.wait_for(cancelled.wait(), 10)
        reply = await requester.request(pair.server_name, 7020, b"next", timeout=10)
        assert reply.data == b"next"
        assert replier.cancelled == 1


async def test_a_cancelled_request_task_cancels_the_handler_too(pair: Pair) -> None:
    handler, started, cancelled = slow_until_cancelled()
    async with (
        serving(pair.server.transport, 7021, handler),
        Requester(pair.client.transport) as requester,
    ):
        asking = asyncio.create_task(
            requester.request(pair.server_name, 7021, b"slow", timeout=60))
        await asyncio.wait_for(started.wait(), 10)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        await asyncio.wait_for(cancelled.wait(), 10)


async def test_a_replier_sees_which_requests_were_given_up(pair: Pair) -> None:
    """With `async for`, the application runs the work: `cancelled` and `on_cancel` tell it, and
    an answer to a cancelled request is not sent."""
    async with (
        Replier(pair.server.transport, 7022) as replier,
        Requester(pair.client.transport) as requester,
    ):
        asking = asyncio.create_task(
            requester.request(pair.server_name, 7022, b"x", timeout=1))
        request = await replier.receive(timeout=10)
        told = asyncio.Event()
        request.on_cancel(told.set)
        with pytest.raises(PilotTimeoutError):
            await asking
        with pytest.raises(PilotTimeoutError):  # nothing else comes; the CANCEL is read
            await replier.receive(timeout=2)
        assert request.cancelled and told.is_set()
        await request.reply(b"late")  # dropped: nobody waits for it
        assert replier.cancelled == 1 and replier.malformed == 0


async def test_requests_sharing_a_stream_that_time_out_are_each_given_up(pair: Pair) -> None:
    """One request reads the stream for all; the others await their replies. Each of those
    that timed out went without its CANCEL (its own cancellation had cancelled what it awaited,
    which read as answered), so its replier worked on for nobody."""
    async with (
        Replier(pair.server.transport, 7023) as replier,
        Requester(pair.client.transport, ReqRepConfig(streams_per_peer=1)) as requester,
    ):
        asking = [asyncio.create_task(requester.request(pair.server_name, 7023, b"x", timeout=1))
                  for _ in range(3)]
        requests = [await replier.receive(timeout=10) for _ in range(3)]
        for task in asking:
            with pytest.raises(PilotTimeoutError):
                await task
        with pytest.raises(PilotTimeoutError):  # nothing else comes; the CANCELs are read
            await replier.receive(timeout=2)
        assert [request.cancelled for request in requests] == [True, True, True]
        assert replier.cancelled == 3


async def streams_open(pair: Pair, kind: str) -> int:
    """The requester's streams as seen from outside it: embedded, those the replier's node has
    not seen end; through daemons, those the requester's daemon holds for its client."""
    if kind == "embedded":
        node = pair.server.transport
        assert isinstance(node, Node)
        return len(node._streams)
    client = pair.client.transport
    assert isinstance(client, Client)
    return int((await client.info())["streams"])


async def eventually(condition: Callable[[], Awaitable[bool]], what: str,
                     seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)


async def test_streams_unused_for_idle_timeout_are_closed_and_forgotten(
        pair: Pair, kind: str) -> None:
    """A long-lived requester (a gateway) kept a stream to every peer and port it ever asked,
    and an entry for each, for ever: memory in both nodes, and streams counted against the
    peers' limits. One unused for idle_timeout now closes and goes; the next request to its
    port opens a new one."""
    ports = range(7030, 7035)
    async with contextlib.AsyncExitStack() as stack:
        for port in ports:
            await stack.enter_async_context(serving(pair.server.transport, port, echo))
        before = await streams_open(pair, kind)
        requester = await stack.enter_async_context(
            Requester(pair.client.transport, ReqRepConfig(idle_timeout=0.3)))
        for port in ports:
            await requester.request(pair.server_name, port, port, timeout=10)
        assert len(requester._streams) == len(ports)
        assert await streams_open(pair, kind) == before + len(ports)

        async def all_gone() -> bool:
            return await streams_open(pair, kind) == before

        await eventually(all_gone, "the idle streams closed")
        assert requester._streams == {} and requester._opening == {}
        reply = await requester.request(pair.server_name, ports[0], ["again"], timeout=10)
        assert reply.json()["echo"] == ["again"]
        assert await streams_open(pair, kind) == before + 1


async def test_requests_racing_idle_closes_all_succeed(pair: Pair) -> None:
    """Bursts of concurrent requests, each about when the last burst's streams fall idle: a
    request finding its stream closed under it opens a new one, and none fails."""
    streams: set[int] = set()  # the requester streams the replier saw, by source port

    async def handler(request: Request) -> object:
        streams.add(request._message.source_port)
        await asyncio.sleep(0.01)
        return request.data

    config = ReqRepConfig(streams_per_peer=2, max_in_flight=2, idle_timeout=0.1)
    async with (
        serving(pair.server.transport, 7040, handler),
        Requester(pair.client.transport, config) as requester,
    ):
        for burst in range(16):
            await asyncio.sleep(0.07 + 0.01 * (burst % 8))
            replies = await asyncio.gather(*(
                requester.request(pair.server_name, 7040, str(n), timeout=10)
                for n in range(8)))
            assert [r.text() for r in replies] == [str(n) for n in range(8)]
    assert len(streams) > config.streams_per_peer  # streams closed and opened meanwhile


async def test_a_stream_that_fails_is_forgotten_at_once(pair: Pair) -> None:
    """A request to a port nobody listens on, or whose stream the replier's node resets (the
    replier closed before reading it), left its peer and port an entry (a lock, a list, the
    dead stream in it) until the next request there, if one ever came."""
    async with Requester(pair.client.transport) as requester:
        for port in range(7050, 7055):
            with pytest.raises(PortClosedError):
                await requester.request(pair.server_name, port, "anyone?", timeout=10)
        assert requester._streams == {} and requester._opening == {}
        async with Replier(pair.server.transport, 7056):
            waiting = asyncio.create_task(
                requester.request(pair.server_name, 7056, "hello?", timeout=30))
            await asyncio.sleep(0.3)
        with pytest.raises(PilotError):
            await asyncio.wait_for(waiting, 15)
        assert requester._streams == {} and requester._opening == {}


async def test_a_cancel_to_a_replier_that_does_not_read_gives_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CANCEL through the daemon is a task of its own: to a replier whose stream is full its
    send would wait for ever, and each request timing out meanwhile would leave one more."""
    monkeypatch.setattr(reqrep, "CANCEL_WAIT", 0.05)

    class Stuck:
        async def send(self, data: bytes) -> None:
            await asyncio.Event().wait()

    await asyncio.wait_for(reqrep._send_quietly(Stuck(), b"cancel"),  # type: ignore[arg-type]
                           1.0)


async def test_a_requester_that_reads_no_replies_cannot_hold_the_replier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One peer sends requests and never reads the replies: they fill its stream, and each
    handler's reply waited for room there for ever, until every handler did and nobody else was
    answered. Now the stream is reset once its peer has read nothing of it for
    UNREAD_REPLIES_TIMEOUT (1 s here), and the replier goes on."""
    monkeypatch.setattr(reqrep, "UNREAD_REPLIES_TIMEOUT", 1.0, raising=False)
    async with server_and_two_clients(tmp_path) as (server, hostile, good):

        async def big_echo(request: Request) -> object:
            return request.data

        config = ReqRepConfig(handler_concurrency=2)
        async with serving(server, 7040, big_echo, config), Requester(good) as requester:
            conn = hostile.connect(server.node_id, 7040)
            await conn.__aenter__()
            try:
                # 40 MiB of replies: what the hostile node's stream window (16 MiB) takes, and
                # more than the stream's bound (8 MiB) waiting at the replier.
                for request_id in range(1, 41):
                    await conn.send(encode_frame(Kind.REQUEST, request_id, b"x" * 2**20))
                started = time.monotonic()
                reply = await requester.request(server.node_id, 7040, b"hi", timeout=20)
                assert reply.data == b"hi"
                assert time.monotonic() - started < 10
                with pytest.raises(PilotError, match="went unread for too long"):
                    while True:  # the replies it took before, then the reset
                        await conn.receive(timeout=10)
            finally:
                await conn.abort()


async def test_through_daemons_a_requester_that_reads_no_replies_cannot_hold_the_replier(
        ) -> None:
    """The same through two daemons: the replier's daemon holds its client's replies for room,
    and resets the stream once its peer has read nothing of it for unread_replies_timeout."""
    alpha, beta = started(("alpha", {}), ("beta", {"unread_replies_timeout": 1}))
    try:
        async def big_echo(request: Request) -> object:
            return request.data

        async with (
            Client(alpha.home) as requesting,
            Client(beta.home) as replying,
            serving(replying, 7041, big_echo, ReqRepConfig(handler_concurrency=2)),
            Requester(requesting) as requester,
        ):
            conn = requesting.connect("beta", 7041)
            await conn.__aenter__()
            try:
                # What alpha's inbox (16 MiB) and the stream's window (16 MiB) take, and more
                # than the stream's bound (8 MiB) waiting at beta.
                for request_id in range(1, 65):
                    await conn.send(encode_frame(Kind.REQUEST, request_id, b"x" * 2**20))
                started_at = time.monotonic()
                reply = await requester.request("beta", 7041, b"hi", timeout=30)
                assert reply.data == b"hi"
                assert time.monotonic() - started_at < 20
                with pytest.raises(PilotError, match="went unread for too long"):
                    while True:
                        await conn.receive(timeout=10)
            finally:
                await conn.abort()
    finally:
        stop_daemons(alpha.home, beta.home)


async def test_a_request_to_a_port_without_a_replier_says_so(pair: Pair) -> None:
    """Whatever asks (the CLI's request, a bridge, a pipeline step): what is missing is a
    replier, where the daemon's words suggested 'pilotctl listen'."""
    async with Requester(pair.client.transport) as requester:
        with pytest.raises(PortClosedError, match=f"^{pair.server_name} has no replier on port "
                           "7042 .*'pilotctl serve 7042 --exec CMD'"):
            await requester.request(pair.server_name, 7042, b"x", timeout=10)


async def test_a_request_waits_its_own_timeout_for_a_replier_that_comes_up(
        tmp_path: Path) -> None:
    """Its stream was opened within the transport's connect timeout (10 s), so a request that
    might wait 20 s for its reply gave up after 10 on a peer that was on its way up."""
    async with Node(home=tmp_path / "b", listen="127.0.0.1:0") as b:
        b_id, b_address = b.node_id, b.local_endpoint  # its key and address, for later
    async with Node(home=tmp_path / "a", listen="127.0.0.1:0") as a:
        a.trust(b_id)
        a.add_peer(b_id, b_address)

        async def replier_in(seconds: float) -> None:
            await asyncio.sleep(seconds)
            async with Node(home=tmp_path / "b", listen=f"127.0.0.1:{b_address[1]}") as late:
                late.trust(a.node_id)
                async with serving(late, 7043, echo):
                    await asyncio.sleep(5)

        starting = asyncio.create_task(replier_in(11))
        try:
            async with Requester(a) as requester:
                reply = await requester.request(b_id, 7043, {"q": 1}, timeout=25)
                assert reply.json() == {"echo": {"q": 1}, "from": a.node_id}
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting


async def test_a_requester_that_goes_away_without_a_cancel_stops_its_handler(
        pair: Pair) -> None:
    """A requester killed mid-request (or whose tunnel closed) sends no CANCEL: its handler (a
    long model call, say) ran on to its end for nobody, holding a handler slot. Its stream's
    end now says the same as a CANCEL: the handler is cancelled and the slot serves the next."""
    handler, started, cancelled = slow_until_cancelled()
    async with (
        serving(pair.server.transport, 7023, handler, ReqRepConfig(handler_concurrency=1))
        as replier,
        Requester(pair.client.transport) as requester,
    ):
        # A requester's own stream, reset with the request unanswered and no CANCEL sent:
        # what its node does to the streams of a process that died.
        conn = pair.client.transport.connect(pair.server_name, 7023)
        await conn.__aenter__()
        await conn.send(encode_frame(Kind.REQUEST, 1, b"slow"))
        await asyncio.wait_for(started.wait(), 10)
        await conn.abort()
        await asyncio.wait_for(cancelled.wait(), 10)
        reply = await requester.request(pair.server_name, 7023, b"next", timeout=10)
        assert reply.data == b"next"
        assert replier.cancelled == 1


KILLED_REQUESTER = textwrap.dedent("""
    import asyncio, sys
    import pilot_agents.sdk as pilot
    from pilot_agents.patterns import Requester

    async def main() -> None:
        async with pilot.Client(sys.argv[1]) as client, Requester(client) as requester:
            await requester.request("beta", 7024, b"slow", timeout=300)

    asyncio.run(main())
""")


async def test_a_killed_requester_process_stops_its_handler_through_daemons(
        daemon_pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    """The case above as it happens: the requesting process is killed (SIGKILL) while its
    request runs. Its daemon resets the streams it held, and the replier's handler stops."""
    a, b = daemon_pair
    handler, started, cancelled = slow_until_cancelled()
    async with Client(b.home) as replying, serving(replying, 7024, handler) as replier:
        child = subprocess.Popen([sys.executable, "-c", KILLED_REQUESTER, str(a.home)],
                                 start_new_session=True)
        try:
            await asyncio.wait_for(started.wait(), 30)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        await asyncio.wait_for(cancelled.wait(), 10)
        assert replier.cancelled == 1
