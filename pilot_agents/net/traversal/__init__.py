"""NAT traversal, sans-IO: the beacon's wire format, the node's beacon client (registration,
resolution, introductions, relay) and STUN. Imports the tunnel's crypto, nothing above it."""
