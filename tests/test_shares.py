"""A peer's share of what a listening end serves at once (patterns/shares.py): each bound has
a per-peer field, by default a fraction of the bound (so that a bound set lower keeps a share
below it: pub/sub's was a fixed 256, which left a publisher of 256 slots or fewer none), and
set, from 1 to the bound, else a ConfigError naming that field."""

from __future__ import annotations

import pytest

from pilot_agents.errors import ConfigError
from pilot_agents.integrations.langgraph import ServeGraphConfig
from pilot_agents.integrations.mcp import McpConfig
from pilot_agents.patterns.pubsub import PubSubConfig
from pilot_agents.patterns.pushpull import PushPullConfig


@pytest.mark.parametrize(("config", "bound", "share", "default"), [
    (PubSubConfig, "max_subscribers", "subscribers_per_peer", 256),
    (PushPullConfig, "max_links", "links_per_peer", 32),
    (ServeGraphConfig, "max_streams", "streams_per_peer", 8),
    (McpConfig, "max_sessions", "sessions_per_peer", 4),
])
def test_a_peers_share_is_from_one_to_the_bound(config: type, bound: str, share: str,
                                                default: int) -> None:
    per_peer = f"{bound}_per_peer"
    assert getattr(config(), share) == default
    assert getattr(config(**{bound: 1}), share) == 1
    assert getattr(config(**{bound: 10, per_peer: 10}), share) == 10
    for wrong in (0, 11):
        with pytest.raises(ConfigError, match=rf"^{config.__name__}\.{per_peer} must be at least "
                                              rf"1 and at most {bound} \(10\), not {wrong}$"):
            config(**{bound: 10, per_peer: wrong})
