"""``McpTool``: a LangGraph step calling a tool of a stdio MCP server this process starts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import Runnable, RunnableConfig

from ...errors import ConfigError, McpToolError, MissingStateKeyError, PilotTimeoutError
from .remote import innermost

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream
    from mcp import ClientSession, StdioServerParameters
    from mcp.client._transport import ReadStream
    from mcp.shared.message import SessionMessage
    from mcp_types import CallToolResult

log = logging.getLogger("pilot_agents.integrations.mcp")


ServerSpec = Mapping[str, Any]  # an entry of an MCP client's mcpServers: command, args, env


def _parameters(server: ServerSpec | StdioServerParameters) -> StdioServerParameters:
    from mcp import StdioServerParameters

    if isinstance(server, StdioServerParameters):
        return server
    unknown = set(server) - {"command", "args", "env", "cwd"}
    if "command" not in server or unknown:
        raise ConfigError(f"an MCP server is given as {{command, args, env}} (as in an MCP "
                          f"client's mcpServers config), not {sorted(server)}")
    return StdioServerParameters(**server)


class _StdioServers:
    """This process's stdio MCP servers, each started on first use and reused until the process
    ends. They live on one event loop, in a thread of their own: ``stdio_client`` must be left
    by the task that entered it, and a step may run under ``invoke`` (no loop, or a worker
    thread) as well as under ``ainvoke`` (any loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: dict[str, asyncio.Future[ClientSession]] = {}
        self._gone: dict[str, asyncio.Event] = {}  # set: the host of that server leaves

    def call(self, params: StdioServerParameters, tool: str, arguments: dict[str, Any],
             start_timeout: float) -> concurrent.futures.Future[CallToolResult]:
        """Call ``tool``, starting its server if it is not running: a start that takes more
        than ``start_timeout`` fails (else every later call would wait for the same one)."""
        return asyncio.run_coroutine_threadsafe(
            self._call(params, tool, arguments, start_timeout), self._running_loop())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="mcp-stdio-servers",
                                 daemon=True).start()
                self._loop = loop
            return self._loop

    async def _call(self, params: StdioServerParameters, tool: str,
                    arguments: dict[str, Any], start_timeout: float) -> CallToolResult:
        key = params.model_dump_json()
        if key not in self._sessions:
            ready: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
            self._sessions[key] = ready
            asyncio.get_running_loop().create_task(
                self._host(key, params, ready, start_timeout))
        ready = self._sessions[key]
        # Shielded: a caller that gives up (its timeout) must not cancel the start that the
        # other callers wait for too.
        session = await asyncio.shield(ready)
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED

        try:
            return await session.call_tool(tool, arguments)
        except MCPError as exc:  # no such tool, bad arguments, the server gone
            # Its process died: the next call starts a new one. Only if this one is still the
            # server of the key: else _gone[key] is a newer server's, which would be stopped.
            if exc.error.code == CONNECTION_CLOSED and self._sessions.get(key) is ready:
                self._gone[key].set()
                self._forget(key, ready)
            raise McpToolError(f"MCP tool {tool} of {params.command}: {exc}") from None

    def _forget(self, key: str, ready: asyncio.Future[ClientSession]) -> None:
        """The server ``ready`` stands for is gone: the next call starts another."""
        if self._sessions.get(key) is ready:
            del self._sessions[key]

    async def _host(self, key: str, params: StdioServerParameters,
                    ready: asyncio.Future[ClientSession], start_timeout: float) -> None:
        """Runs the server while this process runs; if it fails to start (in time) or dies,
        the next call starts it again."""
        import anyio
        from mcp import ClientSession, stdio_client
        from mcp.shared.message import SessionMessage

        gone = self._gone[key] = asyncio.Event()
        stderr = await _StderrTail.open()

        async def watch(read: ReadStream[SessionMessage | Exception],
                        to_session: MemoryObjectSendStream[SessionMessage | Exception]) -> None:
            """The server's messages to its session, and its stdout's end, which is its death
            (or as good): seen only by a call failing, a server that died between calls
            failed the next call too, where it should have been started again."""
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                async with to_session:
                    async for message in read:
                        await to_session.send(message)
            gone.set()
            self._forget(key, ready)

        try:
            async with stdio_client(params, errlog=stderr.writer) as (read, write):
                to_session, session_reads = anyio.create_memory_object_stream[
                    SessionMessage | Exception](0)
                watching = asyncio.create_task(watch(read, to_session))
                try:
                    async with ClientSession(session_reads, write) as session:
                        try:
                            async with asyncio.timeout(start_timeout):
                                await session.initialize()
                        except TimeoutError:
                            raise McpToolError(f"it did not answer 'initialize' within "
                                               f"{start_timeout:g} s") from None
                        ready.set_result(session)
                        await gone.wait()
                finally:
                    watching.cancel()
                    session_reads.close()
        except Exception as exc:
            said = await stderr.last_words()
            why = f"{innermost(exc)}" + (f"; its stderr ended with: {said}" if said else "")
            if not ready.done():
                ready.set_exception(McpToolError(
                    f"cannot start the MCP server {params.command}: {why}"))
            else:
                log.warning("the MCP server %s ended: %s", params.command, why)
        finally:
            stderr.close()
            self._forget(key, ready)


class _StderrTail(asyncio.Protocol):
    """A server's stderr, passed on to ours as it comes, its last bytes kept: a server that
    dies at start (a missing setting, say) says why there, and the error should too."""

    KEEP = 2048  # bytes
    WAIT = 0.5  # seconds the last words may take to arrive after the server failed

    def __init__(self, writer: Any) -> None:
        self.writer = writer  # the pipe's end the server writes to (a file: stdio_client's)
        self._tail = bytearray()
        self._ended = asyncio.Event()
        self._transport: asyncio.BaseTransport | None = None

    @classmethod
    async def open(cls) -> _StderrTail:
        read_fd, write_fd = os.pipe()
        tail = cls(os.fdopen(write_fd, "w"))
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: tail, os.fdopen(read_fd, "rb", buffering=0))
        return tail

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # our stderr closed: still kept here
            if (raw := getattr(sys.stderr, "buffer", None)) is not None:
                raw.write(data)
                raw.flush()
            else:  # replaced by text (a test's capture, a notebook)
                sys.stderr.write(data.decode("utf-8", "replace"))
        self._tail += data
        del self._tail[:-self.KEEP]

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended.set()

    async def last_words(self) -> str:
        """Its last line or so, once it ended (or after WAIT, if it lives on)."""
        self.writer.close()  # ours: the server's end closes as it exits
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.WAIT):
                await self._ended.wait()
        lines = self._tail.decode("utf-8", "replace").strip().splitlines()
        return " / ".join(lines[-3:])[-500:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
        if self._transport is not None:
            self._transport.close()


_SERVERS = _StdioServers()
_MISSING = object()


class McpTool(Runnable[Any, dict[str, Any]]):
    """A LangGraph step that calls ``tool`` of a stdio MCP server and puts its result in state:

        graph.add_node("now", McpTool({"command": "uvx", "args": ["mcp-server-time"]},
                                      "get_current_time", args_from_state={"timezone": "tz"},
                                      result_key="now"))

    ``server`` is an entry of an MCP client's ``mcpServers`` config (``command``, ``args``,
    ``env``), or a ``StdioServerParameters``; it is started once per process on first use and
    reused by every step naming the same one. ``args_from_state`` builds the tool's arguments:
    a mapping of argument name to state key, or a function of the state (default: none). The
    result is the tool's structured content if it has some, else its text (parsed if it is
    JSON), under ``result_key``. A tool error raises :class:`McpToolError`.
    """

    def __init__(self, server: ServerSpec | StdioServerParameters, tool: str, *,
                 args_from_state: Mapping[str, str] | Callable[[Any], dict[str, Any]]
                 | None = None, result_key: str = "result", timeout: float = 60.0) -> None:
        self.server = _parameters(server)
        self.tool = tool
        self.args_from_state = args_from_state
        self.result_key = result_key
        self.timeout = timeout  # seconds one call may take, the server's start included

    def _arguments(self, state: Any) -> dict[str, Any]:
        if self.args_from_state is None:
            return {}
        if callable(self.args_from_state):
            return self.args_from_state(state)
        arguments = {}
        for arg, key in self.args_from_state.items():  # a TypedDict state, dataclass, pydantic
            value = (state.get(key, _MISSING) if isinstance(state, Mapping)
                     else getattr(state, key, _MISSING))
            if value is _MISSING:
                raise MissingStateKeyError(
                    f"McpTool {self.tool!r} reads the state key {key!r}, which this state does "
                    "not have; set it in an earlier node or the graph's input, or name another key")
            arguments[arg] = value
        return arguments

    def _update(self, result: CallToolResult) -> dict[str, Any]:
        from mcp_types import TextContent

        texts = [block.text for block in result.content if isinstance(block, TextContent)]
        if result.is_error:
            raise McpToolError(f"MCP tool {self.tool} failed: {' '.join(texts) or 'no reason'}")
        if result.structured_content is not None:
            return {self.result_key: result.structured_content}
        text = "\n".join(texts)
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        return {self.result_key: value}

    def invoke(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any) -> dict[str, Any]:
        future = _SERVERS.call(self.server, self.tool, self._arguments(input), self.timeout)
        try:
            return self._update(future.result(self.timeout))
        except TimeoutError:
            future.cancel()
            raise PilotTimeoutError(f"MCP tool {self.tool} took more than {self.timeout:g} s")\
                from None

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> dict[str, Any]:
        future = _SERVERS.call(self.server, self.tool, self._arguments(input), self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                return self._update(await asyncio.wrap_future(future))
        except TimeoutError:
            future.cancel()
            raise PilotTimeoutError(f"MCP tool {self.tool} took more than {self.timeout:g} s")\
                from None


__all__ = ["McpTool", "ServerSpec"]
