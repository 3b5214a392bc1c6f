"""YAML pipelines: agents described in one file, run together or one per machine.

- :mod:`.schema`: the file's pydantic schema (agents, MCP servers, steps, edges, settings) and the
  trust it implies between agents.
- :mod:`.load`: reading a file; every error names the file, the line and the field.
- :mod:`.variables`: ``${PIPELINE_DIR}``, ``${PORT:NAME}``, ``${ENV:-DEFAULT}`` in its strings.
- :mod:`.graph`: an agent's steps as a compiled LangGraph graph.
- :mod:`.run`: running one agent (its daemon, trust, its graph) or all of them (a beacon, the
  file's services, and a process per agent), with events for :mod:`.progress` to show.

The user guide is docs/pipeline.md.
"""
