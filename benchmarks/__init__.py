"""Benchmarks of pilot-agents beside raw UDP, ZeroMQ and QUIC: ``python -m benchmarks.bench``."""
