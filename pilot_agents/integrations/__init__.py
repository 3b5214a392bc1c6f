"""Bridges from pilot-agents' transports to other systems (ZeroMQ, LangGraph, MCP)."""
