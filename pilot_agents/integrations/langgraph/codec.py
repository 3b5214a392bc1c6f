"""How LangGraph values travel in tunnel messages.

A value that is plain JSON (dicts with string keys, lists, strings, numbers, booleans, null)
goes as itself, so a peer that is not a graph (``pilotctl receive``, a ``patterns.reqrep``
handler) reads it as it would any JSON message. Anything else — LangChain messages, ``Interrupt``,
``Command``, datetimes, sets, pydantic models — goes through LangGraph's own checkpoint serializer
(``JsonPlusSerializer``, msgpack) inside a small envelope::

    {"pilot": "lg-value/1", "msgpack": "<base64>"}

A message sent by :class:`~pilot_agents.integrations.langgraph.PilotSend` is an envelope around
such a value with the idempotency key its receiver deduplicates on::

    {"pilot": "lg-send/1", "id": "<idempotency key>", "key": "<state key>", "value": <value>}

and a call of a served graph is ``{"pilot": "lg-graph/1", "op": "invoke" | "stream", "input":
<value>, "config": {"configurable": {...}}}``.

Decoding is strict about what it builds: the receiver's serializer constructs only LangGraph's
list of safe types (messages, documents, datetimes, ...) plus the types a node is given in
``allowed_types``; any other class a peer names arrives as its raw fields (a dict), never
constructed. And a received value must be data, not an instruction to the graph it lands in:
one holding LangGraph's own types (``Overwrite``, ``Command``, ``Send``...), a
``RemoveMessage``, or the plain-JSON spellings LangGraph's reducers take for an overwrite or a
removal is refused with a :class:`WireError`, unless the caller expects that type there (a
served graph takes ``Command(resume=...)``, a remote graph's output holds its interrupts).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import deque
from collections.abc import Iterable
from typing import Any

from langchain_core.messages import RemoveMessage
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.types import Command, Interrupt

from ...errors import UnserializableValueError, WireError

VALUE = "lg-value/1"
SEND = "lg-send/1"
GRAPH = "lg-graph/1"
MARK = "pilot"  # the key that makes a JSON object one of our envelopes
# LangGraph's reducers take {OVERWRITE: v} and {"type": OVERWRITE, "value": v} as Overwrite(v),
# and add_messages a message dict of type "remove" as a RemoveMessage.
OVERWRITE = "__overwrite__"
BYPASS = "which would bypass the state's reducers"
REMOVES = "which would delete messages from the state"


def is_json(value: object) -> bool:
    """True if ``value`` survives a JSON round trip unchanged (so it may go as itself)."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json(v) for k, v in value.items())
    return False


class Codec:
    """Values to JSON and back; ``allowed_types``: classes (or ``(module, name)`` pairs) a peer
    may make us construct beyond LangGraph's safe list."""

    def __init__(self, allowed_types: Iterable[type | tuple[str, ...]] = ()) -> None:
        self._writer = JsonPlusSerializer()
        strict = JsonPlusSerializer(allowed_msgpack_modules=None)
        allowed = tuple(allowed_types)
        self._reader = strict.with_msgpack_allowlist(allowed) if allowed else strict
        self._allowed = allowed

    def encode(self, value: object, what: str = "the value") -> Any:
        """``value`` as a JSON value; :class:`UnserializableValueError` naming ``what``."""
        try:
            if is_json(value) and not (isinstance(value, dict) and MARK in value):
                return value
            kind, data = self._writer.dumps_typed(value)
        except RecursionError:
            raise UnserializableValueError(
                f"{what} is nested deeper than Python's recursion limit, or contains itself: "
                "put plain data in the state") from None
        except (TypeError, ValueError) as exc:
            raise UnserializableValueError(
                f"{what} is a {type(value).__name__}, which is neither JSON nor anything "
                f"LangGraph's serializer can encode ({exc}); put plain data, messages or "
                f"pydantic models in the state") from None
        if kind != "msgpack":  # None and bytes: the serializer's other two cases
            return {MARK: VALUE, "type": kind, "data": base64.b64encode(data).decode("ascii")}
        return {MARK: VALUE, "msgpack": base64.b64encode(data).decode("ascii")}

    def decode(self, value: Any, expected: tuple[type, ...] = ()) -> Any:
        """The value :meth:`encode` made; :class:`WireError` if an envelope is malformed or
        the value is an instruction to a graph (see the module's notes) of a type neither
        ``expected`` here nor in ``allowed_types``. ``expected`` may hold ``Command``, taken
        only as a resume, and ``Interrupt``."""
        decoded = self._decode(value)
        problem = instruction(decoded, (*expected, *self._allowed))
        if problem is not None:
            raise WireError(f"a value holding {problem}: a peer may send plain data, "
                            f"messages and the types given in allowed_types= only")
        return decoded

    def _decode(self, value: Any) -> Any:
        if not (isinstance(value, dict) and value.get(MARK) == VALUE):
            return value
        try:
            if "msgpack" in value:
                return self._reader.loads_typed(("msgpack", _b64(value["msgpack"])))
            kind = value["type"]
            if kind not in ("null", "bytes", "bytearray"):
                raise WireError(f"a value of unknown type {kind!r}")
            return self._reader.loads_typed((kind, _b64(value["data"])))
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise WireError(f"a malformed value envelope ({type(exc).__name__}: {exc})") from None


def instruction(value: object, expected: tuple[type | tuple[str, ...], ...]) -> str | None:
    """What in ``value`` would be an instruction to a graph rather than data, or None. Only
    containers are looked into: a reducer or LangGraph looks no deeper than a list's items, and
    the fields of an allowed class are its own business."""
    pending: list[object] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if (problem := _instruction_dict(item)) is not None:
                return problem
            pending.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset | deque):
            pending.extend(item)
        elif _is_expected(item, expected):
            if isinstance(item, Command):
                if item.update is not None or item.goto or item.graph is not None:
                    return ("a LangGraph Command with goto, graph or update, where only a "
                            "resume is taken")
                pending.append(item.resume)
            elif isinstance(item, Interrupt):
                pending.append(item.value)
        elif isinstance(item, RemoveMessage):
            return f"a RemoveMessage, {REMOVES}"
        elif type(item).__module__.split(".")[0] == "langgraph":
            name = type(item).__name__
            return f"a LangGraph {name}, " + (BYPASS if name == "Overwrite" else
                                              "an instruction to the graph, not data")
    return None


def _instruction_dict(item: dict[Any, Any]) -> str | None:
    if (OVERWRITE in item and len(item) == 1) or (item.get("type") == OVERWRITE
                                                  and "value" in item):
        return f"a dict LangGraph takes as an Overwrite, {BYPASS}"
    kind = item.get("role", item.get("type"))
    if kind == "remove" and "content" in item:
        return f"a message dict of type 'remove', {REMOVES}"
    names = item.get("id") if item.get("lc") == 1 else None
    if isinstance(names, list) and names and names[-1] == "RemoveMessage":
        return f"a serialized RemoveMessage, {REMOVES}"
    return None


def _is_expected(item: object, expected: tuple[type | tuple[str, ...], ...]) -> bool:
    cls = type(item)
    return any(cls is e if isinstance(e, type) else (cls.__module__, cls.__name__) == e
               for e in expected)


def parse(data: bytes) -> Any:
    """A received message's bytes as JSON (envelopes left as they are), else text, else bytes:
    a peer that is not a graph may send anything. :class:`WireError` for JSON nested deeper
    than Python parses (``[[[...``: a peer's way to crash a parser that does not catch it)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise WireError("a JSON value nested deeper than Python's recursion limit") from None
    except UnicodeDecodeError:
        return data
    except ValueError:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data


def _b64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("base64 data must be a string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
