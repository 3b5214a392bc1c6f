"""LangGraph nodes that talk to other agents through pilot tunnels, by hostname.

    from langgraph.graph import START, StateGraph
    from pilot_agents.integrations.langgraph import PilotReceive, PilotSend

    builder = StateGraph(State)
    builder.add_node("fetch", fetch)
    builder.add_node("send", PilotSend("analyzer", port=1001, key="csv"))
    builder.add_edge(START, "fetch")
    builder.add_edge("fetch", "send")
    graph = builder.compile()
    graph.invoke({"url": "..."})     # or: await graph.ainvoke(...)

- :class:`PilotSend`: a state key to a peer, with a delivery receipt and an idempotency key.
- :class:`PilotReceive`: a message from a peer (any trusted one, or those in ``senders=``) into
  the state (duplicates dropped).
- :class:`PilotRequest`: a state key as a request, the reply into the state.
- :func:`serve_graph` / :func:`serving_graph`: a compiled graph answering trusted peers;
  :class:`PilotRemoteGraph`: such a graph, used like a local one (and as a subgraph node).

Each takes ``transport=`` (an embedded Node or a daemon Client); by default it uses the daemon
of ``$PILOT_HOME``. The user guide is docs/langgraph.md; the wire format, :mod:`.codec`.
"""

from .base import DeliveryConfig, PilotNode
from .nodes import PilotReceive, PilotRequest, PilotSend
from .remote import (
    GraphServer,
    PilotRemoteGraph,
    ServeGraphConfig,
    peer_thread,
    serve_graph,
    serving_graph,
)

__all__ = ["DeliveryConfig", "GraphServer", "PilotNode", "PilotReceive", "PilotRemoteGraph",
           "PilotRequest", "PilotSend", "ServeGraphConfig", "peer_thread", "serve_graph",
           "serving_graph"]
