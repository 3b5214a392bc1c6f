"""SendStream's acknowledgement bookkeeping against a model: whatever order chunks are
acknowledged in (duplicates and overlaps included), the buffer keeps exactly the bytes from the
first unacknowledged one on, and retransmissions carry the original bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents.net.tunnel.streams import SendStream


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=8),
    chunk=st.integers(1, 1500),
    order=st.randoms(use_true_random=False),
    repeats=st.integers(0, 3),
)
def test_acks_in_any_order_free_exactly_the_acknowledged_prefix(
    sizes: list[int], chunk: int, order: object, repeats: int
) -> None:
    stream = SendStream(max_data=1 << 30)
    written = b""
    for i, size in enumerate(sizes):
        data = bytes([i % 251]) * size
        stream.write_message(data)
        written += len(data).to_bytes(8, "big") + data
    chunks = []
    while (item := stream.next_chunk(chunk, 1 << 30)) is not None:
        offset, data, fin = item
        assert data == written[offset : offset + len(data)]
        chunks.append((offset, len(data), fin))
    acks = chunks * (1 + repeats)
    order.shuffle(acks)  # type: ignore[attr-defined]
    acked = [False] * len(written)
    for offset, length, fin in acks:
        stream.on_acked(offset, length, fin)
        acked[offset : offset + length] = [True] * length
        prefix = next((i for i, done in enumerate(acked) if not done), len(written))
        assert stream.buffered == len(written) - prefix
    assert stream.buffered == 0
