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
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import (
    ConfigError,
    KeyMismatchError,
    TrustRequestError,
)
from .identity import Identity, key_from_node_id, node_id_from_key
from .net.tunnel import crypto

TRUST_FILE = "trust.json"
REQUEST_DOMAIN = b"pilot-agents trust request v1\x00"
SIGNATURE_SIZE = 64
MAX_REQUEST_SIZE = 4096  # bytes, signature included
MAX_REASON_LENGTH = 500  # characters
MAX_HOSTNAME_LENGTH = 253
REQUEST_MAX_AGE = 600.0  # seconds a request stays valid (and the clock skew we accept)
MAX_PENDING = 256  # incoming requests kept; the oldest is dropped beyond that

TrustState = Literal["mutual", "outgoing", "incoming"]
_NODE_ID_RE = re.compile(r"^[a-z2-7]{52}$")


def is_node_id(text: str) -> bool:
    try:
        key_from_node_id(text)
    except ConfigError:
        return False
    return True


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
        raise TrustRequestError(f"trust request is malformed: {_first_line(exc)}") from None
    if request.body() != body:
        raise TrustRequestError("trust request is not in canonical form")
    key = key_from_node_id(request.sender)
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


def _first_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else err["msg"]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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


class TrustStore:
    """The persistent trust set of one home. Only the daemon writes it."""

    def __init__(self, path: Path, entries: Iterable[TrustEntry] = ()) -> None:
        self.path = path
        self.max_pending = MAX_PENDING  # incoming requests kept; the oldest is dropped beyond
        self._entries: dict[str, TrustEntry] = {e.node_id: e for e in entries}

    @classmethod
    def load(cls, home: str | Path) -> TrustStore:
        path = Path(home) / TRUST_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data = TrustFile.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(
                f"{path} is not a valid trust store ({_first_line(exc)}): fix or remove it"
            ) from None
        return cls(path, data.entries)

    def save(self) -> None:
        """Write atomically, mode 0600."""
        text = TrustFile(entries=sorted(self._entries.values(), key=lambda e: e.added_at))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text.model_dump_json(indent=2) + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
        """The trusted entry whose pinned name is ``hostname``."""
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
            entry = self._entries.get(target.strip().lower())
            if entry is not None and entry.state in wanted:
                return entry
            raise ConfigError(f"{target} is not in the trust store")
        matches = [e for e in self._entries.values() if e.hostname == target and e.state in wanted]
        if not matches:
            raise ConfigError(f"{target} is not in the trust store")
        if len(matches) > 1:
            ids = ", ".join(e.node_id for e in matches)
            raise ConfigError(f"several entries are named {target} ({ids}): use the node id")
        return matches[0]

    def check_pin(self, hostname: str, node_id: str) -> None:
        """Raise KeyMismatchError if ``hostname`` is pinned to a key other than ``node_id``."""
        entry = self.pinned(hostname)
        if entry is not None and entry.node_id != node_id:
            raise KeyMismatchError(
                f"{hostname} resolves to key {node_id}, but you trusted it as key "
                f"{entry.node_id}; refusing the new key. If {hostname} really has a new key, run "
                f"'pilotctl trust remove {hostname}' and then 'pilotctl trust add {hostname}'"
            )

    # -- changes (each saves) --------------------------------------------------------------

    def add_trusted(
        self, node_id: str, hostname: str | None, reason: str = "", now: float | None = None,
    ) -> TrustEntry:
        """Trust ``node_id`` (pinned to ``hostname``). If it had asked us, trust is now mutual."""
        now = time.time() if now is None else now
        if hostname is not None:
            self.check_pin(hostname, node_id)
        entry = self._entries.get(node_id)
        if entry is None:
            entry = TrustEntry(node_id=node_id, hostname=hostname, state="outgoing",
                               reason=reason, added_at=now, updated_at=now)
        elif entry.state == "incoming":
            entry = entry.model_copy(update={
                "state": "mutual", "hostname": hostname or entry.hostname, "updated_at": now,
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

    def receive_request(
        self, request: TrustRequest, raw: bytes, now: float | None = None,
    ) -> TrustEntry:
        """Record a verified request: confirms trust we already gave, or becomes pending."""
        now = time.time() if now is None else now
        entry = self._entries.get(request.sender)
        if entry is not None and entry.trusted:
            if entry.state == "outgoing":
                entry = entry.model_copy(update={"state": "mutual", "updated_at": now})
                self._entries[request.sender] = entry
                self.save()
            return entry
        entry = TrustEntry(
            node_id=request.sender, hostname=request.hostname, state="incoming",
            reason=request.reason, added_at=entry.added_at if entry else now, updated_at=now,
            request=base64.b64encode(raw).decode("ascii"),
        )
        self._entries[request.sender] = entry
        pending = self.pending()
        for old in pending[: max(0, len(pending) - self.max_pending)]:
            del self._entries[old.node_id]
        self.save()
        return entry

    def remove(self, node_id: str) -> TrustEntry:
        entry = self._entries.pop(node_id)
        self.save()
        return entry
