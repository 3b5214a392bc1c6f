"""The ``mcp`` step: a call of a tool of one of the agent's stdio MCP servers, made by
:class:`pilot_agents.integrations.mcp.McpTool` (one MCP client in the project: this only maps the
step's fields onto it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.runnables import Runnable

from ..errors import MissingStateKeyError
from ..integrations.mcp import McpTool
from .schema import McpCall, McpServer


def mcp_node(server: McpServer, call: McpCall) -> Runnable[Any, Any]:
    """The step as a LangGraph node: constant ``args`` merged with ``args_from_state``."""
    spec = server.model_dump()
    if not call.args:
        return McpTool(spec, call.tool, args_from_state=dict(call.args_from_state),
                      result_key=call.result_key, timeout=call.timeout)

    def arguments(state: Any) -> dict[str, Any]:
        out = dict(call.args)
        for arg, key in call.args_from_state.items():
            if not (isinstance(state, Mapping) and key in state):
                raise MissingStateKeyError(
                    f"the mcp step calling {call.tool!r} reads the state key {key!r}, which "
                    "this state does not have; set it in an earlier step or name another key")
            out[arg] = state[key]
        return out

    return McpTool(spec, call.tool, args_from_state=arguments, result_key=call.result_key,
                   timeout=call.timeout)
