"""The asyncio driver: the UDP socket and the endpoint that feeds the sans-IO tunnel and
traversal protocols with datagrams and timers. The only part of ``net`` that touches sockets."""
