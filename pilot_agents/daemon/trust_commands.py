"""Trust: the ``trust_*`` commands, and trust requests arriving from the network."""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import logging

from ..errors import (
    ConfigError,
    HostOfflineError,
    KeyMismatchError,
    NotTrustedError,
    PilotError,
    TrustRequestError,
    UnknownHostError,
)
from ..net.traversal.beacon_wire import canonical_name
from ..node.node import PeerInfo
from ..terminal import escape_unsafe
from ..trust import (
    TrustEntry,
    TrustRequest,
    is_node_id,
    make_trust_request,
    parse_trust_request_untrusted,
)
from .context import DaemonContext
from .dispatch import DispatchTable, Reply
from .messaging import Messaging
from .requests import (
    TrustAddRequest,
    TrustApproveRequest,
    TrustExportRequest,
    TrustImportRequest,
    TrustListRequest,
    TrustPendingRequest,
    TrustRejectRequest,
    TrustRemoveRequest,
)

log = logging.getLogger("pilot_agents.daemon")

SEEN_NONCES = 4096  # trust request nonces remembered against replays


class TrustCommands:
    def __init__(self, ctx: DaemonContext, messaging: Messaging) -> None:
        self.ctx = ctx
        self.messaging = messaging
        self._seen_nonces: collections.OrderedDict[str, None] = collections.OrderedDict()

    def register(self, table: DispatchTable) -> None:
        table.add(TrustAddRequest, self.add)
        table.add(TrustApproveRequest, self.approve)
        table.add(TrustRejectRequest, self.reject)
        table.add(TrustRemoveRequest, self.remove)
        table.add(TrustListRequest, self.list)
        table.add(TrustPendingRequest, self.pending)
        table.add(TrustExportRequest, self.export)
        table.add(TrustImportRequest, self.import_)

    # -- commands ------------------------------------------------------------------------------

    async def add(self, req: TrustAddRequest) -> Reply:
        store, node = self.ctx.store, self.ctx.node
        target = canonical_name(req.target)
        try:
            found = await self.ctx.lookup(target)
        except HostOfflineError:
            # The name is registered to a node that is away: it is not free for a claim, and
            # its key can't be checked now.
            raise HostOfflineError(
                f"{target} belongs to a node that is offline now (the beacon holds the name for "
                f"its key), so its key can't be checked: try again once {target} is online, or "
                "trust it by its node id. A trust request claiming the name does not show that "
                "it came from that node"
            ) from None
        except UnknownHostError:
            # No beacon knows the name, but a pending request may claim it: approve that one.
            claims = [e for e in store.pending() if e.hostname == target]
            if len(claims) != 1:
                raise
            return await self._approve(claims[0], target)
        node_id, hostname = found.node_id, found.hostname
        if node_id == node.node_id:
            raise ConfigError("that is this node's own id")
        if hostname is None and self.ctx.has_beacon:
            with contextlib.suppress(PilotError):  # by node id: learn (and pin) its name
                info = await node.resolve(node_id)
                if info.node_id == node_id and info.hostname:
                    hostname = info.hostname
        pending = store.get(node_id)
        if pending is not None and pending.state == "incoming":
            return await self._approve(pending, target)
        entry = store.add_trusted(node_id, hostname, req.reason)
        node.trust(node_id, entry.hostname)
        log.info("trusted %s (%s): %s", entry.label, node_id, entry.state)
        sent, note = await self._send_trust_request(
            node_id, target if self.ctx.has_beacon else node_id, req.reason)
        return self._trusted_reply(entry, sent, note)

    async def approve(self, req: TrustApproveRequest) -> Reply:
        store = self.ctx.store
        try:
            pending = store.find(req.target, states=["incoming"])
        except ConfigError:
            existing = None
            with contextlib.suppress(ConfigError):
                existing = store.find(req.target)
            if existing is not None:
                return {"entry": existing.public(), "request_sent": False,
                        "note": f"{existing.label} is already trusted ({existing.state})"}
            raise ConfigError(
                f"no pending trust request from {req.target} (see 'pilotctl trust pending')"
            ) from None
        return await self._approve(pending, canonical_name(req.target))

    async def _approve(self, pending: TrustEntry, target: str) -> Reply:
        """Trust the sender of a pending request and answer with our own request."""
        hostname = pending.hostname
        if hostname is not None and self.ctx.has_beacon:
            # The name in a request is only a claim: the beacon says whose name it is.
            info: PeerInfo | None
            offline = False
            try:
                info = await self.ctx.node.resolve(hostname)
            except UnknownHostError as exc:
                info, offline = None, isinstance(exc, HostOfflineError)
            if info is None or info.node_id != pending.node_id:
                if not is_node_id(target):
                    if offline:  # the name is another node's (or this one's: can't tell now)
                        raise KeyMismatchError(
                            f"the request from key {pending.node_id} claims the name "
                            f"{hostname}, which belongs to a node that is offline now, so the "
                            f"claim can't be checked; not approved. Try again once {hostname} "
                            "is online"
                        )
                    owner = f"is key {info.node_id}" if info else "does not know it"
                    raise KeyMismatchError(
                        f"the request from key {pending.node_id} claims the name {hostname}, "
                        f"but the beacon {owner}; not approved. To trust that key anyway: "
                        f"'pilotctl trust approve {pending.node_id}'"
                    )
                hostname = None  # approved by key: don't pin a name that isn't its own
        entry = self.ctx.store.add_trusted(pending.node_id, hostname, "")
        self.ctx.node.trust(pending.node_id, entry.hostname)
        log.info("approved %s (%s): %s", entry.label, entry.node_id, entry.state)
        sent, note = await self._send_trust_request(
            entry.node_id, hostname if (self.ctx.has_beacon and hostname) else entry.node_id, "")
        return self._trusted_reply(entry, sent, note)

    @staticmethod
    def _trusted_reply(entry: TrustEntry, sent: bool, note: str) -> Reply:
        if entry.state == "mutual":
            note = f"trust with {entry.label} is mutual" + (
                "" if sent else "; it sees that once a tunnel between you comes up")
        return {"entry": entry.public(), "request_sent": sent, "note": note}

    async def reject(self, req: TrustRejectRequest) -> Reply:
        try:
            entry = self.ctx.store.find(req.target, states=["incoming"])
        except ConfigError:
            raise ConfigError(
                f"no pending trust request from {req.target} (see 'pilotctl trust pending')"
            ) from None
        self.ctx.store.remove(entry.node_id)
        log.info("rejected %s (%s)", entry.label, entry.node_id)
        return {"entry": entry.public()}

    async def remove(self, req: TrustRemoveRequest) -> Reply:
        try:
            entry = self.ctx.store.find(req.target)
        except ConfigError:
            raise ConfigError(f"{req.target} is not in the trust store "
                              "(see 'pilotctl trust list')") from None
        self.ctx.store.remove(entry.node_id)
        dropped = 0
        if entry.trusted:
            self.ctx.node.untrust(entry.node_id)
            self.messaging.drop_streams_to(entry.node_id)
            dropped = self.messaging.drop_messages_from(entry.node_id)
        log.info("removed %s (%s) from the trust store; %d of its unread messages dropped",
                 entry.label, entry.node_id, dropped)
        return {"entry": entry.public(), "messages_dropped": dropped}

    async def list(self, req: TrustListRequest) -> Reply:
        return {"entries": [e.public() for e in self.ctx.store.entries()]}

    async def pending(self, req: TrustPendingRequest) -> Reply:
        return {"pending": [e.public() for e in self.ctx.store.pending()]}

    async def export(self, req: TrustExportRequest) -> Reply:
        found = await self.ctx.lookup(req.target)
        if not self.ctx.store.is_trusted(found.node_id):
            label = found.hostname or req.target
            raise NotTrustedError(
                f"trust {label} before asking it to trust you: run 'pilotctl trust add {label}'")
        request = make_trust_request(self.ctx.node.identity, found.node_id, self.ctx.hostname(),
                                     req.reason)
        return {"request": base64.b64encode(request).decode("ascii"), "to": found.node_id}

    async def import_(self, req: TrustImportRequest) -> Reply:
        try:
            raw = base64.b64decode(req.request.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise TrustRequestError("that is not a trust request (not base64)") from None
        request = parse_trust_request_untrusted(raw, None, self.ctx.node.node_id)
        return {"entry": self._accept_request(request, raw).public()}

    # -- trust requests from the network --------------------------------------------------------

    def on_trust_request(self, sender_key: bytes, payload: bytes) -> None:
        """Called by the Node when the beacon relays a trust request to us."""
        if not self.ctx.store.admit(sender_key):
            return  # over its rate (or everybody's): dropped before any signature check
        try:
            request = parse_trust_request_untrusted(payload, sender_key, self.ctx.node.node_id)
            self._accept_request(request, payload)
        except (TrustRequestError, ConfigError) as exc:
            log.warning("ignored a trust request: %s", exc)
        except Exception:
            log.exception("failed to handle a trust request")

    def _accept_request(self, request: TrustRequest, raw: bytes) -> TrustEntry:
        if request.nonce in self._seen_nonces:
            raise TrustRequestError(self._replayed(request))
        self._seen_nonces[request.nonce] = None
        while len(self._seen_nonces) > SEEN_NONCES:
            self._seen_nonces.popitem(last=False)
        entry = self.ctx.store.receive_request(request, raw)
        if entry.state == "incoming":
            log.info("trust request from %s, claiming the name %s: %s; pending",
                     request.sender, request.hostname, escape_unsafe(repr(request.reason)))
        else:
            log.info("trust with %s (%s) is now %s", entry.label, entry.node_id, entry.state)
        return entry

    def _replayed(self, request: TrustRequest) -> str:
        """Why a request seen before is refused, and where its first coming left things."""
        entry = self.ctx.store.get(request.sender)
        said = "this trust request was already received"
        if entry is None:
            return f"{said} (and its sender is no longer in the trust store: ask for a new one)"
        if entry.state == "incoming":
            return f"{said}; it waits for approval: 'pilotctl trust approve {entry.label}'"
        return f"{said}; trust with {entry.label} is {entry.state} ('pilotctl trust list')"

    async def _send_trust_request(self, node_id: str, target: str, reason: str) -> tuple[
            bool, str]:
        """Ask the peer to trust us; ``(sent, note)``."""
        node = self.ctx.node
        me = self.ctx.me()
        if not self.ctx.has_beacon:
            return False, (
                "no beacon, so no trust request was sent: on the peer run "
                f"'pilotctl trust add {node.node_id}' (or import the request from "
                f"'pilotctl trust export {node_id}')"
            )
        request = make_trust_request(node.identity, node_id, self.ctx.hostname(), reason)
        try:
            await node.send_trust_request(target, request)
        except PilotError as exc:
            log.info("trust request to %s not delivered: %s", target, exc)
            return False, (f"the trust request was not delivered ({exc}); it is mutual once "
                           f"the peer runs 'pilotctl trust add {me}'")
        return True, f"trust request sent; it is mutual once the peer trusts {me} too"
