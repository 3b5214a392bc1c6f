"""The publish/subscribe steps: Publisher.drain on embedded Nodes; the steps end to end through
`pilot-agents run` (real beacon, daemons and tunnels)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from pilot_agents import PilotTimeoutError
from pilot_agents.patterns import Publisher, Subscriber
from tests.conftest import ROOT
from tests.test_pipeline_run import CMD, daemon_pids, events_of, alive
from tests.test_pubsub import until_subscribed
from tests.transport_pairs import embedded


async def test_drain_waits_until_the_queues_are_sent(tmp_path: Path) -> None:
    async with embedded(tmp_path) as pair:
        async with Subscriber(pair.client.transport, pair.server_name, 8101, [""]) as sub:
            async with Publisher(pair.server.transport, 8101) as pub:
                await until_subscribed(pub, 1)
                for n in range(5):
                    await pub.publish("t", b"x" * 30_000 + bytes([n]))
                with pytest.raises(PilotTimeoutError, match="5 publications still queued for "
                                   "1 subscribers after 0 s"):
                    await pub.drain(0)
                await pub.drain(10)
            # Closed right after the drain: every publication had reached the transport.
            assert [(await sub.receive(5)).data[-1] for _ in range(5)] == [0, 1, 2, 3, 4]
