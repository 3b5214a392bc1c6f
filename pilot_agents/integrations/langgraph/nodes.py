"""The three nodes: send a state key to a peer, receive one, ask a peer and wait for its answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig

from ...errors import ConfigError, PilotTimeoutError, PortClosedError, WireError
from ...patterns.reqrep import Requester
from ...transport import DEFAULT_PORT, DEFAULT_TIMEOUT, Message, Transport
from .base import (
    BoundedMemory,
    CallCounter,
    DeliveryConfig,
    PilotNode,
    bounded,
    idempotency_key,
    read_key,
    task_of,
)
from .codec import MARK, SEND, parse

log = logging.getLogger("pilot_agents.integrations.langgraph")

AllowedTypes = Iterable[type | tuple[str, ...]]


def to_bytes(value: Any) -> bytes:
    """A JSON value as message bytes (a string too, so the peer reads it back as JSON)."""
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class PilotSend(PilotNode):
    """Send the state's ``key`` to port ``port`` of peer ``to``; the update it returns is a
    delivery receipt under ``receipt_key`` (default ``KEY_receipt``)::

        {"to": "analyzer", "peer": NODE_ID, "port": 1001, "id": IDEMPOTENCY_KEY,
         "bytes": 1234, "path": "direct", "rtt": 0.0004, "sent_at": UNIX_SECONDS}

    The message is sent once the peer's port has a listener (a daemon's inbox ports always do):
    until then it is tried again every ``delivery.retry_interval`` seconds, for up to
    ``timeout`` seconds in all. It carries an idempotency key equal for every run of the same
    LangGraph task, so when LangGraph runs the task again — an ``interrupt()`` later in the same
    node, a retry, a resume after the process died before the task was checkpointed — the
    receiving :class:`PilotReceive` drops the copy."""

    def __init__(self, to: str, port: int = DEFAULT_PORT, key: str = "message", *,
                 receipt_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 transport: Transport | None = None, home: str | Path | None = None,
                 delivery: DeliveryConfig | None = None, name: str | None = None) -> None:
        super().__init__(transport=transport, home=home, allowed_types=(), delivery=delivery,
                         name=name or f"PilotSend({to}, {port})")
        self.to, self.port, self.key = to, port, key
        self.timeout = bounded(timeout, self.label)
        self.receipt_key = receipt_key or f"{key}_receipt"

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        value = read_key(state, self.key, self.label)
        message_id = idempotency_key(config, "send", self.to, self.port, self.key)
        data = to_bytes({MARK: SEND, "id": message_id, "key": self.key,
                         "value": self.codec.encode(value, f"the state key {self.key!r}")})
        receipt = await self._deliver(transport, data)
        receipt.update(id=message_id, bytes=len(data), sent_at=time.time())
        return {self.receipt_key: receipt}

    async def _deliver(self, transport: Transport, data: bytes) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    conn = transport.connect(self.to, self.port,
                                             timeout=max(deadline - loop.time(), 0.001))
                    async with conn:
                        await conn.send(data)
                        receipt = {"to": self.to, "peer": conn.peer_id, "port": self.port,
                                   "path": conn.path, "rtt": conn.rtt}
                    # Leaving the block closed the stream, which waits until the peer has it.
                    return receipt
            except PortClosedError:
                if loop.time() + self.delivery.retry_interval >= deadline:
                    raise PilotTimeoutError(
                        f"{self.to} had no listener on port {self.port} for {self.timeout} s: "
                        f"start its PilotReceive (or daemon) first, or raise timeout=") from None
                await asyncio.sleep(self.delivery.retry_interval)
            except PilotTimeoutError:
                raise
            except TimeoutError:
                raise PilotTimeoutError(
                    f"could not deliver to {self.to} port {self.port} within {self.timeout} s"
                ) from None


class PilotReceive(PilotNode):
    """Wait up to ``timeout`` seconds for a message on ``port`` and write it into the state:
    its value under ``key``, its sender (hostname if known, else node id) under ``sender_key``
    (default ``KEY_from``). A message from :class:`PilotSend` arrives as the value it sent
    (typed values rebuilt); any other message as its JSON, else its text, else its bytes.

    ``senders``: the peers accepted (hostnames as the daemon knows them, or node ids); by
    default any trusted peer. A message from another peer is refused: taken from the port,
    logged as a warning naming the peer, counted in :attr:`refused`, and the wait goes on.

    Values that are LangGraph instructions rather than data (an ``Overwrite``, a
    ``RemoveMessage``, a ``Command``...) are refused likewise, counted in :attr:`malformed`.

    Duplicates: the idempotency keys of the last ``delivery.remembered_ids`` messages, from all
    senders together, are kept (each for its sender, in this object, so in memory: a restarted
    receiver forgets them), and a message whose key is among them is dropped and counted in
    :attr:`duplicates`. Called again in one execution of a LangGraph task, it gets the next
    message; a re-run of the task gets, call by call, the messages the run before it took (the
    last ``delivery.remembered_receives`` are kept), then new ones."""

    def __init__(self, port: int = DEFAULT_PORT, key: str = "message", *,
                 sender_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 senders: Iterable[str] | None = None,
                 transport: Transport | None = None, home: str | Path | None = None,
                 allowed_types: AllowedTypes = (), delivery: DeliveryConfig | None = None,
                 name: str | None = None) -> None:
        super().__init__(transport=transport, home=home, allowed_types=allowed_types,
                         delivery=delivery, name=name or f"PilotReceive({port})")
        self.port, self.key, self.timeout = port, key, timeout
        self.sender_key = sender_key or f"{key}_from"
        self.senders = accepted_senders(senders, self.label)
        self._seen: BoundedMemory[tuple[str, str], None] = BoundedMemory(
            self.delivery.remembered_ids)
        self._taken: BoundedMemory[tuple[str, int], dict[str, Any]] = BoundedMemory(
            self.delivery.remembered_receives)
        self._calls = CallCounter(self.delivery.remembered_receives)
        self.duplicates = 0  # messages dropped because their idempotency key was seen
        self.malformed = 0  # messages from a peer that did not parse, or held no plain data
        self.refused = 0  # messages from peers not in ``senders``

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        task = task_of(config)
        # Taken in this call: the n-th call of every run of the task is one receive.
        taken = None if task is None else (task, self._calls.next(config))
        if taken is not None and (update := self._taken.get(taken)) is not None:
            return update
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            try:
                message = await transport.receive(self.port, timeout=remaining)
            except PilotTimeoutError:
                raise PilotTimeoutError(
                    f"{self.label}: no message on port {self.port} within {self.timeout} s"
                ) from None
            sender = getattr(message, "hostname", None) or message.sender
            if not self._accepts(message):
                self.refused += 1
                log.warning("%s refused a message from %s on port %d: it accepts only %s "
                            "(senders=)", self.label, sender, self.port,
                            ", ".join(sorted(self.senders or ())))
                continue
            try:
                value = self._value(message)
            except WireError as exc:
                self.malformed += 1
                log.warning("%s refused a message from %s on port %d: %s", self.label, sender,
                            self.port, exc)
                continue
            if value is _DUPLICATE:
                continue
            update = {self.key: value, self.sender_key: sender}
            if taken is not None:
                self._taken.add(taken, update)
            return update

    def _accepts(self, message: Message) -> bool:
        if self.senders is None:
            return True
        names = (message.sender, getattr(message, "hostname", None) or "")
        return any(name.lower() in self.senders for name in names)

    def _value(self, message: Message) -> Any:
        body = parse(message.data)
        if not (isinstance(body, dict) and body.get(MARK) == SEND):
            return self.codec.decode(body)
        message_id = body.get("id")
        if not isinstance(message_id, str) or "value" not in body:
            raise WireError("a send envelope without an id or a value")
        value = self.codec.decode(body["value"])  # a malformed one is not remembered
        if not self._seen.add((message.sender, message_id), None):
            self.duplicates += 1
            log.info("dropped a second copy of message %s from %s", message_id, message.sender)
            return _DUPLICATE
        return value


def accepted_senders(senders: Iterable[str] | None, who: str) -> frozenset[str] | None:
    """``senders`` as the lower-case names a message's sender is matched against (node ids and
    hostnames are case-insensitive); None: any trusted peer."""
    if senders is None:
        return None
    if isinstance(senders, str) or not all(isinstance(s, str) and s.strip() for s in senders):
        raise ConfigError(f"{who}: senders= takes a list of hostnames or node ids, such as "
                          f"senders=['scraper'], not {senders!r}")
    names = frozenset(s.strip().lower() for s in senders)
    if not names:
        raise ConfigError(f"{who}: senders=[] accepts nobody; leave it out to accept any "
                          f"trusted peer")
    return names


_DUPLICATE = object()


class PilotRequest(PilotNode):
    """Send the state's ``key`` as a request to the replier on ``port`` of ``to`` (a
    :func:`~pilot_agents.patterns.reqrep.serve` handler, or a graph exposed by
    :func:`serve_graph`, which takes it as its input state) and put the reply under
    ``result_key``: one agent calls another like a tool. A request reaches the replier at most
    once per call; a re-run of the task asks again, as a re-run tool call would."""

    def __init__(self, to: str, port: int, key: str, result_key: str, *,
                 timeout: float = DEFAULT_TIMEOUT, transport: Transport | None = None,
                 home: str | Path | None = None, allowed_types: AllowedTypes = (),
                 name: str | None = None) -> None:
        super().__init__(transport=transport, home=home, allowed_types=allowed_types,
                         delivery=None, name=name or f"PilotRequest({to}, {port})")
        self.to, self.port, self.key, self.result_key = to, port, key, result_key
        self.timeout = bounded(timeout, self.label)

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        value = read_key(state, self.key, self.label)
        body = to_bytes(self.codec.encode(value, f"the state key {self.key!r}"))
        return {self.result_key: await call(transport, self.to, self.port, body, self.timeout,
                                            self.reply_value)}


async def call(transport: Transport, to: str, port: int, body: bytes, timeout: float,
               decode: Callable[[Any], Any]) -> Any:
    """One request and its decoded reply."""
    async with Requester(transport) as requester:
        reply = await requester.request(to, port, body, timeout=timeout)
    return decoded(decode, parse(reply.data), to, port)


def decoded(decode: Callable[[Any], Any], value: Any, to: str, port: int) -> Any:
    """``decode(value)`` of what ``to`` answered on ``port``. The codec cannot know who sent
    the value, and a bad one is the peer's doing: its error names the peer and port."""
    try:
        return decode(value)
    except WireError as exc:
        raise WireError(f"{to} port {port} answered {exc}, which this node cannot read: does "
                        f"a served graph or a req/rep handler of pilot-agents answer there?"
                        ) from None
