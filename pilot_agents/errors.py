"""The one exception tree of pilot-agents.

Every error a caller can see derives from :class:`PilotError`, and its message says what to do.
Errors that describe a peer's misbehaviour on the wire (:class:`WireError`, :class:`CryptoError`)
are caught inside the stack and turned into counters or close events; they only reach a caller
when the caller itself handed us the bad bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class PilotError(Exception):
    """Root of every pilot-agents error."""


class ConfigError(PilotError):
    """A setting, argument or file given by the user is invalid."""


class PortInUseError(ConfigError):
    """A listen that wants a port's messages to itself (``exclusive``: an MCP server's, whose
    sessions are tied to one listener) found it listened on already, or a listen found the port
    held that way."""


class IdentityError(PilotError):
    """The node's key file is missing, malformed or readable by others."""


class WireError(PilotError):
    """Bytes from the network do not parse as a pilot-agents packet or frame."""


class CryptoError(PilotError):
    """Authentication of a packet or handshake message failed."""


class HandshakeError(CryptoError):
    """A Noise handshake message was malformed, forged or out of order."""


class NotTrustedError(PilotError):
    """The peer is not in the trust set (or we are not in its)."""


def not_trusted(label: str, state: str | None) -> NotTrustedError | None:
    """Why a peer whose trust store entry is in ``state`` ("mutual", "outgoing", "incoming";
    None: none) may not be talked to, with the command that fixes it; None if it may."""
    if state == "incoming":
        return NotTrustedError(f"{label} asked you to trust it but you have not approved it: "
                               f"run 'pilotctl trust approve {label}'")
    if state is None:
        return NotTrustedError(f"{label} is not trusted: run 'pilotctl trust add {label}'")
    return None


class PilotTimeoutError(PilotError, TimeoutError):
    """A network wait ran out of time."""


class PeerUnreachableError(PilotError):
    """No path to the peer answered: it is down, unknown, or does not trust us."""


class ConnectionClosedError(PilotError):
    """The tunnel or stream was closed; ``code`` and ``reason`` say why."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class PortClosedError(ConnectionClosedError):
    """The peer has no listener on the port we connected to."""


class PortBusyError(ConnectionClosedError):
    """The peer's port has as many of our streams at once as one port may have: its reader is
    behind (each one-shot message waits there in a stream of its own). Try again later; other
    ports of the peer are not affected."""


class BeaconError(PilotError):
    """The beacon refused us (a registration, a lookup) or can't be reached."""


class NameTakenError(BeaconError):
    """The hostname belongs to another node's key: the first key to register a name owns it."""


class UnknownHostError(BeaconError):
    """The beacon knows no node by that name (or it is offline)."""


class HostOfflineError(UnknownHostError):
    """The beacon knows the name, but the node holding it is not registered now: the name is
    not free, it belongs to that node's key."""


class StoreUnavailableError(BeaconError):
    """The beacon's shared registry (Redis) did not answer, or answered with an error."""


class TooManyConnectionsError(PilotError):
    """Every local port for connections to one peer is taken by an open connection."""


class MessageTooLargeError(PilotError):
    """A message exceeds the configured maximum message size."""


class KeyMismatchError(PilotError):
    """A name now resolves to a different key than the one pinned when it was trusted."""


class TrustRequestError(PilotError):
    """A trust request is malformed, forged, stale or meant for another node."""


# -- the daemon and its local API ---------------------------------------------------------------


class DaemonNotRunningError(PilotError):
    """No daemon runs for this home, or it does not answer."""


class HomeInUseError(PilotError):
    """Another process runs a node (a daemon or an embedded Node) on this home."""


class DaemonRunningError(HomeInUseError):
    """A daemon already runs for this home."""


class UnsafeHomeError(ConfigError):
    """The home, or a file in it, belongs to another user or others can write to it."""


class BadRequestError(PilotError):
    """An IPC request was not valid JSON or not a valid command."""


class DaemonOutdatedError(BadRequestError):
    """The daemon refused a request, and it runs other code than the program asking: the
    package was upgraded, reinstalled or changed since it started, and it may not know the
    request. Restart it."""


class BusyError(PilotError):
    """The daemon refused a request: this client already has as many in flight as it may."""


class NotAvailableError(PilotError):
    """The feature is not available in this build or configuration."""


class InternalError(PilotError):
    """A bug in the daemon; the details are in daemon.log."""


def _subclasses(cls: type[PilotError]) -> list[type[PilotError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


# An IPC error reply names its exception's class; the client raises the same class from it.
BY_NAME: dict[str, type[PilotError]] = {cls.__name__: cls for cls in _subclasses(PilotError)}


def from_name(name: str, message: str) -> PilotError:
    """The error an IPC reply names, or a plain :class:`PilotError` for a name this version does
    not know (a newer daemon)."""
    cls = BY_NAME.get(name, PilotError)
    try:
        return cls(message)
    except TypeError:  # a constructor with required arguments beyond the message
        return PilotError(message)


# -- message-bus patterns -----------------------------------------------------------------------


class RemoteError(PilotError):
    """The peer's handler raised while answering our request; ``remote_type`` names the
    exception it raised there, and the message is its message."""

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type


class StoppedError(PilotError):
    """User code run for a peer (a served graph's node) called ``sys.exit()`` or raised
    ``KeyboardInterrupt``: that run failed with this error, and the process serving goes on.
    The requester sees it as a :class:`RemoteError`."""


@contextlib.contextmanager
def stops_as(error: Callable[[str], PilotError]) -> Iterator[None]:
    """Raise ``error("raised SystemExit: <its message>")`` for a ``SystemExit`` or
    ``KeyboardInterrupt`` the block raises. They are not Exceptions: asyncio takes them, raised
    in a task, for the process's own end and raises them out of its event loop, so user code
    that calls ``sys.exit()`` would end a whole server or agent. (A real Ctrl-C does not come
    this way: the runtime's signal handler turns it into a cancel.)"""
    try:
        yield
    except (SystemExit, KeyboardInterrupt) as exc:
        said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise error(f"raised {said}") from exc


class CommandFailedError(PilotError):
    """A command run for a request (``pilotctl serve --exec``) exited non-zero, ran past its
    timeout, or wrote more than the reply limit; the message says which, with its stderr's
    tail. The requester sees it as a :class:`RemoteError`."""


# -- integrations -------------------------------------------------------------------------------


class MissingStateKeyError(ConfigError):
    """A LangGraph node was asked to read a key the graph's state does not have."""


class UnserializableValueError(ConfigError):
    """A value is neither JSON nor anything LangGraph's serializer can encode, so it cannot be
    sent to a peer."""


class McpSessionError(PilotError):
    """An MCP session through a tunnel (``pilot_agents.integrations.mcp``) could not open or
    ended: the serving side refused it (all its sessions in use), its server process exited, or
    the peer went silent; the message says which."""


class NoMcpServerError(McpSessionError, PortClosedError):
    """Nothing listens on that port of the peer, so no MCP server either: a session error, and
    a closed port (the CLI's exit status for one)."""


class McpToolError(PilotError):
    """An MCP tool called in a pipeline step (``McpTool``) answered with an error, or its server
    could not start; the message names the tool and says why."""


# -- pipelines ----------------------------------------------------------------------------------


class PipelineError(ConfigError):
    """A pipeline file is invalid; the message names the file, the line and the field."""


class FieldValueError(ValueError):
    """Raised inside the pipeline schema's validators (pydantic reports only ValueErrors) for a
    value deeper than the validated model: ``path`` extends the error's field path, so the
    loader can point at the right line."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


class FieldValueErrors(ValueError):
    """Several :class:`FieldValueError` from one validator, so that a file's every problem of a
    kind is reported at once rather than one per run of ``validate``."""

    def __init__(self, errors: list[FieldValueError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors

    @staticmethod
    def raise_any(errors: list[FieldValueError]) -> None:
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise FieldValueErrors(errors)


class AgentFailedError(PilotError):
    """An agent of a pipeline failed; the message names it and says why."""
