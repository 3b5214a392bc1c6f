"""NAT lab: network namespaces that make an internet, NATs and hosts on one machine.

Needs root and ``ip netns``; see ``topology.py`` for the layout and ``conftest_helpers.py`` for the
pytest fixtures. Debian packages: iproute2 iptables conntrack tcpdump.
"""

from .procs import LabError
from .topology import Capture, Host, Impairment, Lab, Nat, Node, cleanup_stale

__all__ = ["Capture", "Host", "Impairment", "Lab", "LabError", "Nat", "Node", "cleanup_stale"]
