"""Who this node trusts: the trust store kept in the home, and the signed trust requests nodes
exchange to make trust mutual.

Trust is a local decision: ``trust add NAME`` pins the key NAME resolved to and tells the Node to
accept tunnels with it. The peer learns about it from a *trust request*, a small document signed
with our Ed25519 identity key that the beacon relays to it (the only thing an untrusted node can
deliver). Once both sides trust each other the entry is **mutual**.

States of an entry (``trust.json`` in the home, mode 0600):

- ``outgoing``: we trust the peer; it has not (yet) shown that it trusts us.
- ``mutual``: we trust the peer and it trusts us (its request reached us, or a tunnel with it came
  up, which the Noise handshake only allows between nodes that trust each other).
- ``incoming``: the peer asked us to trust it; we have not decided. Not trusted.

Wire format of a trust request (the bytes ``Node.send_trust_request`` carries)::

    signature (64 bytes, Ed25519) || body (UTF-8 JSON, sorted keys, no spaces)
    signature = Ed25519(requester key, b"pilot-agents trust request v1\\0" || body)
    body = {"v": 1, "from": NODE_ID, "to": NODE_ID, "hostname": str|null, "reason": str,
            "ts": unix seconds, "nonce": 32 hex chars}

The receiver checks the signature with the key in ``from`` (which must equal the key the beacon says
sent it), that ``to`` is its own node id (a request can't be forwarded to someone else), and that
``ts`` is within ``REQUEST_MAX_AGE`` of its clock.

Anyone registered at the beacon can send us requests, so what they can make us do is bounded
(:class:`TrustLimits`): requests are rate-limited per sending key and in total before any
signature is checked; at most ``max_pending`` requests wait for a decision, and when that many
wait a request from a new key is dropped (the older ones stay, so spam can't push out a real
request); a repeated request only refreshes its entry; and changes that came from the network are
written to ``trust.json`` at most once per ``save_interval_s`` (and by :meth:`TrustStore.flush`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import (
    ConfigError,
    KeyMismatchError,
    TrustRequestError,
)
from .home import check_home, hold_daemon_lock, read_private_text, write_private
from .identity import Identity, key_from_node_id, looks_like_node_id, node_id_from_key
from .net.traversal.beacon_wire import canonical_name, valid_hostname
from .net.tunnel import crypto
from .net.tunnel.ratelimit import TokenBucket
from .terminal import escape_unsafe, has_unsafe_characters

log = logging.getLogger("pilot_agents.trust")

TRUST_FILE = "trust.json"
REQUEST_DOMAIN = b"pilot-agents trust request v1\x00"
SIGNATURE_SIZE = 64
MAX_REQUEST_SIZE = 4096  # bytes, signature included
MAX_REASON_LENGTH = 500  # characters
MAX_HOSTNAME_LENGTH = 253
REQUEST_MAX_AGE = 600.0  # seconds a request stays valid (and the clock skew we accept)

TrustState = Literal["mutual", "outgoing", "incoming"]
_NODE_ID_RE = re.compile(r"^[a-z2-7]{52}$")


def is_node_id(text: str) -> bool:
    """Whether ``text`` is meant as a node id rather than a name: it has the form of one. A
    typo'd id has it too; :func:`key_from_node_id` refuses it with a message saying so."""
    return looks_like_node_id(text)


def short_id(node_id: str) -> str:
    return node_id[:12] + "…"


# -- trust requests ----------------------------------------------------------------------------


class TrustRequest(BaseModel):
    """The signed body of a trust request (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    v: Literal[1] = 1
    sender: str = Field(alias="from", pattern=_NODE_ID_RE.pattern)
    to: str = Field(pattern=_NODE_ID_RE.pattern)
    hostname: str | None = Field(default=None, min_length=1, max_length=MAX_HOSTNAME_LENGTH)
    reason: str = Field(default="", max_length=MAX_REASON_LENGTH)
    ts: float
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")

    @field_validator("hostname")
    @classmethod
    def _a_hostname(cls, hostname: str | None) -> str | None:
        # Only a name the beacon could register: no look-alikes (a Cyrillic a), no capitals, no
        # control characters. It stays a claim until the beacon confirms it (see _approve).
        if hostname is not None and not valid_hostname(hostname):
            raise ValueError(f"{escape_unsafe(hostname)!r} is not a hostname (a-z, 0-9, -)")
        return hostname

    @field_validator("reason")
    @classmethod
    def _shows_as_written(cls, reason: str) -> str:
        # Shown by 'trust pending' and logged: no escapes, newlines or bidi controls that could
        # forge rows, colours or a terminal's title.
        if has_unsafe_characters(reason):
            raise ValueError("the reason holds control characters (newlines, escapes, bidi "
                             "controls)")
        return reason

    def body(self) -> bytes:
        return json.dumps(
            self.model_dump(by_alias=True), sort_keys=True, separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")


def make_trust_request(
    identity: Identity, to: str, hostname: str | None, reason: str = "",
    now: float | None = None,
) -> bytes:
    """Our signed request asking node ``to`` to trust us."""
    if len(reason) > MAX_REASON_LENGTH:
        raise ConfigError(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    if has_unsafe_characters(reason):
        raise ConfigError("the reason may not hold control characters (newlines, escapes, bidi "
                          "controls): give it on one line")
    hostname = canonical_name(hostname) if hostname else None
    request = TrustRequest.model_validate({
        "from": identity.node_id, "to": to, "hostname": hostname, "reason": reason,
        "ts": time.time() if now is None else now, "nonce": crypto.random_bytes(16).hex(),
    })
    body = request.body()
    return identity.sign(REQUEST_DOMAIN + body) + body


def parse_trust_request_untrusted(
    data: bytes, sender_key: bytes | None, our_node_id: str, now: float | None = None,
) -> TrustRequest:
    """Verify a trust request that came from the network. ``sender_key``: the key the transport
    says sent it (None for a request pasted out of band). Raises only :class:`TrustRequestError`."""
    size = len(data) if isinstance(data, bytes | bytearray) else 0
    if not SIGNATURE_SIZE < size <= MAX_REQUEST_SIZE:
        raise TrustRequestError("trust request has a bad size")
    data = bytes(data)
    signature, body = data[:SIGNATURE_SIZE], data[SIGNATURE_SIZE:]
    try:
        fields = json.loads(body.decode("utf-8"))
        request = TrustRequest.model_validate(fields)
    except (UnicodeDecodeError, ValueError, ValidationError) as exc:
        raise TrustRequestError(f"trust request is malformed: {first_line(exc)}") from None
    if request.body() != body:
        raise TrustRequestError("trust request is not in canonical form")
    try:
        key = key_from_node_id(request.sender)
    except ConfigError as exc:
        raise TrustRequestError(f"trust request is from a bad key: {exc}") from None
    if sender_key is not None and key != sender_key:
        raise TrustRequestError(
            f"trust request claims to be from {request.sender} but was sent by "
            f"{node_id_from_key(sender_key)}"
        )
    if not crypto.ed25519_verify(key, REQUEST_DOMAIN + body, signature):
        raise TrustRequestError("trust request has a bad signature")
    if request.to != our_node_id:
        raise TrustRequestError(f"trust request is addressed to {request.to}, not to us")
    now = time.time() if now is None else now
    if abs(now - request.ts) > REQUEST_MAX_AGE:
        raise TrustRequestError(
            f"trust request is {abs(now - request.ts):.0f} s away from our clock "
            f"(more than {REQUEST_MAX_AGE:.0f} s): check the clocks"
        )
    return request


def first_line(exc: Exception) -> str:
    """What ``exc`` says, on one line: a validation error's first problem and where it is."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else err["msg"]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# -- limits on what the network can make the store do ----------------------------------------


@dataclass(frozen=True)
class TrustLimits:
    """Bounds on the work and storage that trust requests from untrusted nodes can cost us."""

    max_pending: int = 256
    """Requests waiting for approve/reject. When full, a request from a new key is dropped."""
    pending_max_age_s: float = 7 * 24 * 3600.0
    """A pending request older than this (seconds) is forgotten when room is needed."""
    key_rate_per_s: float = 0.2
    """Requests per second one key may send us in the long run (one every 5 s)..."""
    key_burst: int = 4
    """...after a burst of this many."""
    total_rate_per_s: float = 20.0
    """Requests per second from all keys together..."""
    total_burst: int = 40
    """...after a burst of this many."""
    max_keys: int = 4096
    """Keys whose rate we track; the one heard from least recently is forgotten beyond that."""
    save_interval_s: float = 5.0
    """Changes that came from the network are written at most once per this many seconds."""
    drop_log_interval_s: float = 60.0
    """Dropped requests are logged as one count per this many seconds, not one line each."""


class RequestLimiter:
    """Token buckets per sending key (an LRU table of at most ``max_keys``) behind one bucket for
    all keys: decides, before any signature check, whether a request is worth looking at."""

    def __init__(self, limits: TrustLimits, now: float) -> None:
        self.limits = limits
        self._keys: collections.OrderedDict[bytes, TokenBucket] = collections.OrderedDict()
        self._total = TokenBucket(limits.total_rate_per_s, limits.total_burst, now)

    def allow(self, key: bytes, now: float) -> bool:
        limits = self.limits
        bucket = self._keys.pop(key, None) or TokenBucket(
            limits.key_rate_per_s, limits.key_burst, now)
        self._keys[key] = bucket
        while len(self._keys) > limits.max_keys:
            self._keys.popitem(last=False)
        # Both or neither: a refused request costs neither its key nor everybody a token.
        if bucket.refill(now) < 1.0 or self._total.refill(now) < 1.0:
            return False
        return bucket.take(now) and self._total.take(now)

    def __len__(self) -> int:
        return len(self._keys)


# -- the store -----------------------------------------------------------------------------


class TrustEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(pattern=_NODE_ID_RE.pattern)
    hostname: str | None = None  # pinned name (trusted), or the name a requester claims (incoming)
    state: TrustState
    reason: str = ""  # why: ours for outgoing, theirs for incoming
    added_at: float
    updated_at: float
    request: str | None = None  # incoming: the signed request, base64, so it can be re-verified

    @field_validator("hostname")
    @classmethod
    def _canonical_name(cls, hostname: str | None) -> str | None:
        return None if hostname is None else canonical_name(hostname)

    @field_validator("node_id")
    @classmethod
    def _real_key(cls, node_id: str) -> str:
        try:
            key_from_node_id(node_id)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return node_id

    @property
    def trusted(self) -> bool:
        return self.state != "incoming"

    @property
    def label(self) -> str:
        return self.hostname or self.node_id

    def public(self) -> dict[str, object]:
        return self.model_dump(exclude={"request"})


class TrustFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    entries: list[TrustEntry] = Field(default_factory=list)


class _StoredFile(BaseModel):
    """trust.json as read: its entries are checked one by one, so one bad entry (a hand-edited
    typo) is skipped instead of keeping the daemon from starting."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    entries: list[Any] = Field(default_factory=list)


class TrustStore:
    """The persistent trust set of one home. Only the daemon writes it while it runs (see
    :func:`remove_without_daemon` for when it does not).

    Changes asked for by the user are written at once; changes that came from the network
    (:meth:`receive_request`) at most once per ``limits.save_interval_s``: call :meth:`flush`
    before exiting."""

    def __init__(
        self, path: Path, entries: Iterable[TrustEntry] = (), limits: TrustLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.limits = limits or TrustLimits()
        self._entries: dict[str, TrustEntry] = {e.node_id: e for e in entries}
        self._clock = clock
        self._limiter = RequestLimiter(self.limits, clock())
        self._dirty = False
        self._last_save = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._dropped = 0
        self._drops_logged_at = clock()
        self.saves = 0  # writes of trust.json by this store

    @classmethod
    def load(
        cls, home: str | Path, limits: TrustLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> TrustStore:
        """The store of ``home``. UnsafeHomeError if the home or trust.json can be changed by
        another user; ConfigError if trust.json is unreadable as a whole. A bad entry is skipped
        with a warning (and dropped the next time the store is written)."""
        path = Path(home) / TRUST_FILE
        try:
            check_home(path.parent)
            text = read_private_text(path)
        except FileNotFoundError:
            return cls(path, (), limits, clock)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', exc)}") from None
        try:
            data = _StoredFile.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(
                f"{path} is not a valid trust store ({first_line(exc)}): fix or remove it"
            ) from None
        entries = []
        for number, raw in enumerate(data.entries, 1):
            try:
                entries.append(TrustEntry.model_validate(raw))
            except ValidationError as exc:
                log.warning("%s: entry %d skipped (%s); it is dropped the next time the trust "
                            "store is written", path, number, first_line(exc))
        return cls(path, _one_pin_per_name(path, entries), limits, clock)

    def save(self) -> None:
        """Write atomically, mode 0600."""
        text = TrustFile(entries=sorted(self._entries.values(), key=lambda e: e.added_at))
        write_private(self.path, text.model_dump_json(indent=2) + "\n")
        self.saves += 1
        self._dirty = False
        self._last_save = self._clock()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        """Write the changes the network made since the last write, if any."""
        if self._dirty:
            self.save()

    def close(self) -> None:
        """At shutdown: write what the network changed; a failure is logged, not raised."""
        try:
            self.flush()
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc.strerror or exc)

    def _save_soon(self) -> None:
        """A change that came from the network: written now if the last write is older than
        ``save_interval_s``, else when it is (by a timer on the running event loop; without one,
        by the next write or :meth:`flush`)."""
        self._dirty = True
        wait = self._last_save + self.limits.save_interval_s - self._clock()
        if wait <= 0:
            self.save()
        elif self._timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop
                self._timer = asyncio.get_running_loop().call_later(wait, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self.close()

    # -- queries -------------------------------------------------------------------------

    def entries(self) -> list[TrustEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.state == "incoming", e.added_at))

    def trusted(self) -> list[TrustEntry]:
        return [e for e in self.entries() if e.trusted]

    def pending(self) -> list[TrustEntry]:
        return [e for e in self.entries() if e.state == "incoming"]

    def get(self, node_id: str) -> TrustEntry | None:
        return self._entries.get(node_id)

    def is_trusted(self, node_id: str) -> bool:
        entry = self._entries.get(node_id)
        return entry is not None and entry.trusted

    def pinned(self, hostname: str) -> TrustEntry | None:
        """The trusted entry whose pinned name is ``hostname`` (in any case)."""
        hostname = canonical_name(hostname)
        for entry in self._entries.values():
            if entry.trusted and entry.hostname == hostname:
                return entry
        return None

    def name_of(self, node_id: str) -> str | None:
        entry = self._entries.get(node_id)
        return entry.hostname if entry is not None else None

    def find(self, target: str, *, states: Iterable[TrustState] | None = None) -> TrustEntry:
        """The entry for a node id or name; ConfigError if none or ambiguous."""
        wanted = set(states) if states is not None else {"mutual", "outgoing", "incoming"}
        if is_node_id(target):
            entry = self._entries.get(canonical_name(target))
            if entry is not None and entry.state in wanted:
                return entry
            raise ConfigError(f"{target} is not in the trust store")
        name = canonical_name(target)
        matches = [e for e in self._entries.values() if e.hostname == name and e.state in wanted]
        if not matches:
            raise ConfigError(f"{target} is not in the trust store")
        if len(matches) > 1:
            ids = ", ".join(e.node_id for e in matches)
            raise ConfigError(f"several entries are named {target} ({ids}): use the node id")
        return matches[0]

    def check_pin(self, hostname: str, node_id: str) -> None:
        """Raise KeyMismatchError if ``hostname`` is pinned to a key other than ``node_id``."""
        hostname = canonical_name(hostname)
        entry = self.pinned(hostname)
        if entry is not None and entry.node_id != node_id:
            raise KeyMismatchError(
                f"{hostname} resolves to key {node_id}, but you trusted it as key "
                f"{entry.node_id}; refusing the new key. If {hostname} really has a new key, run "
                f"'pilotctl trust remove {hostname}' and then 'pilotctl trust add {hostname}'"
            )

    # -- trust requests from the network -------------------------------------------------------

    def admit(self, sender_key: bytes) -> bool:
        """Whether to look at a trust request the beacon says ``sender_key`` sent: False beyond
        the rate limits, or when the request is from a new key and ``max_pending`` requests wait
        already. Costs a few dict operations: call it before verifying anything."""
        now = self._clock()
        if self._limiter.allow(sender_key, now) and not self._pending_full_for(sender_key):
            return True
        self._dropped += 1
        if now - self._drops_logged_at >= self.limits.drop_log_interval_s:
            log.warning("dropped %d trust requests in the last %.0f s (over the rate limits, or "
                        "%d requests pending already)", self._dropped,
                        now - self._drops_logged_at, self.limits.max_pending)
            self._dropped, self._drops_logged_at = 0, now
        return False

    def _pending_full_for(self, sender_key: bytes) -> bool:
        """Whether a request from this key would be dropped for want of room (see _make_room)."""
        if node_id_from_key(sender_key) in self._entries:
            return False
        oldest = time.time() - self.limits.pending_max_age_s
        waiting = sum(e.state == "incoming" and e.added_at >= oldest
                      for e in self._entries.values())
        return waiting >= self.limits.max_pending

    def receive_request(
        self, request: TrustRequest, raw: bytes, now: float | None = None,
    ) -> TrustEntry:
        """Record a verified request: confirms trust we already gave, or becomes pending.
        TrustRequestError if it would be pending and ``max_pending`` requests wait already."""
        now = time.time() if now is None else now
        entry = self._entries.get(request.sender)
        if entry is not None and entry.trusted:
            if entry.state == "outgoing":
                entry = entry.model_copy(update={"state": "mutual", "updated_at": now})
                self._entries[request.sender] = entry
                self.save()
            return entry
        fresh = TrustEntry(
            node_id=request.sender, hostname=request.hostname, state="incoming",
            reason=request.reason, added_at=entry.added_at if entry else now, updated_at=now,
            request=base64.b64encode(raw).decode("ascii"),
        )
        if entry is None:
            self._make_room(now)
        self._entries[request.sender] = fresh
        # Asked again with the same words: only refreshed in memory, so a repeat costs no write.
        if entry is None or (entry.hostname, entry.reason) != (fresh.hostname, fresh.reason):
            self._save_soon()
        return fresh

    def _make_room(self, now: float) -> None:
        """Forget expired pending requests if the pending set is full; TrustRequestError if
        it still is (the new request is dropped: older requests win)."""
        pending = [e for e in self._entries.values() if e.state == "incoming"]
        if len(pending) < self.limits.max_pending:
            return
        expired = [e for e in pending if now - e.added_at > self.limits.pending_max_age_s]
        for entry in expired:
            del self._entries[entry.node_id]
        if expired:
            self._save_soon()
        if len(pending) - len(expired) >= self.limits.max_pending:
            raise TrustRequestError(
                f"{self.limits.max_pending} trust requests are pending already, so this one is "
                f"dropped: see 'pilotctl trust pending' and reject the ones you don't want"
            )

    # -- changes the user asked for (each saves) ------------------------------------------------

    def add_trusted(
        self, node_id: str, hostname: str | None, reason: str = "", now: float | None = None,
    ) -> TrustEntry:
        """Trust ``node_id`` (pinned to ``hostname``). If it had asked us, trust is now mutual.
        ConfigError, before anything is saved, if ``node_id`` is not a valid key."""
        key_from_node_id(node_id)
        now = time.time() if now is None else now
        if hostname is not None:
            hostname = canonical_name(hostname)
            self.check_pin(hostname, node_id)
        entry = self._entries.get(node_id)
        if entry is None:
            entry = TrustEntry(node_id=node_id, hostname=hostname, state="outgoing",
                               reason=reason, added_at=now, updated_at=now)
        elif entry.state == "incoming":
            # The request's name is only a claim: the caller passes it if it checked it. A
            # pinned name is connected to without a lookup (docs/protocol.md, connection set-up).
            entry = entry.model_copy(update={
                "state": "mutual", "hostname": hostname, "updated_at": now,
                "request": None, "reason": reason or entry.reason,
            })
        else:
            entry = entry.model_copy(update={
                "hostname": entry.hostname or hostname, "updated_at": now,
                "reason": reason or entry.reason,
            })
        self._entries[node_id] = entry
        self.save()
        return entry

    def confirm(self, node_id: str, now: float | None = None) -> bool:
        """The peer showed it trusts us: outgoing becomes mutual. True if the entry changed."""
        entry = self._entries.get(node_id)
        if entry is None or entry.state != "outgoing":
            return False
        now = time.time() if now is None else now
        self._entries[node_id] = entry.model_copy(update={"state": "mutual", "updated_at": now})
        self.save()
        return True

    def remove(self, node_id: str) -> TrustEntry:
        entry = self._entries.pop(node_id)
        self.save()
        return entry


def _one_pin_per_name(path: Path, entries: list[TrustEntry]) -> list[TrustEntry]:
    """Entries read from a store written before names were canonicalised may pin one name to two
    keys (``alice`` and ``Alice``): the first (the older) keeps the name, the later entry is
    dropped with a warning, since it is the one that got around the pin."""
    kept: list[TrustEntry] = []
    owners: dict[str, str] = {}
    for entry in sorted(entries, key=lambda e: e.added_at):
        if entry.trusted and entry.hostname is not None:
            owner = owners.setdefault(entry.hostname, entry.node_id)
            if owner != entry.node_id:
                log.warning("%s: %s is pinned to key %s already; the later entry for key %s "
                            "(the same name in another case) is dropped the next time the trust "
                            "store is written", path, entry.hostname, owner, entry.node_id)
                continue
        kept.append(entry)
    return kept


# -- editing the store while no daemon runs ------------------------------------------------------

def remove_without_daemon(home: str | Path, target: str) -> TrustEntry | None:
    """``trust remove`` when no daemon runs for ``home``: edit trust.json directly, holding the
    daemon's lock. None if a daemon runs: ask it instead (it also tears down the peer's
    tunnels)."""
    home = Path(home)
    try:
        check_home(home)
    except FileNotFoundError:
        raise ConfigError(f"{target} is not in the trust store ({home} does not exist)") from None
    with hold_daemon_lock(home) as held:
        if not held:
            return None
        store = TrustStore.load(home)
        try:
            entry = store.find(target)
        except ConfigError:
            raise ConfigError(f"{target} is not in the trust store of {home}") from None
        log.info("removed %s (%s) from the trust store", entry.label, entry.node_id)
        return store.remove(entry.node_id)
