"""The NAT lab: an "internet" with public hosts and NATed home networks, in network namespaces.

Layout (addresses are RFC 5737 documentation ranges, so nothing here could ever be mistaken for a
real host, and no traffic leaves the namespaces)::

                      inet (router namespace, 192.0.2.1 on every link)
         w1 /            w2 |                  w3 \\            ...
  pub host 198.51.100.2   pub host 198.51.100.3   NAT router wan0=203.0.113.2
  (beacon, public node)                            br0=10.1.0.1/24
                                                    /            \\
                                             host 10.1.0.2   host 10.1.0.3   (same LAN)

Why a router and not a bridge in the middle: each WAN link is its own veth with a /32 address and a
host route in ``inet``, so policy routing can pick out "packets entering from link w3" (or "packets
for 203.0.113.2") and send them through a tun device to the userspace delay line (see
``delayline.py``) -- this kernel has no ``netem`` qdisc. Every link's inet side carries the same
gateway address 192.0.2.1/32 and every host routes ``default via 192.0.2.1``; ARP then works without
proxy_arp because each side answers for its own address.

NATs (iptables in the router's namespace):
- ``cone``: port-restricted cone. ``MASQUERADE`` (Linux keeps the source port and reuses one
  mapping for every destination: endpoint-independent mapping) plus the home-router firewall
  ``INPUT -i wan0 -m conntrack --ctstate NEW -j DROP``. That rule matters for hole punching: without
  it the peer's first probe (arriving before our own outbound packet) is *accepted* to the router
  itself and confirmed in conntrack, and our later outbound packet then collides with that entry
  and gets a different source port.
- ``symmetric``: ``MASQUERADE --random-fully``: a fresh random port for every new 5-tuple.
- ``full-cone``: MASQUERADE plus a DNAT of all inbound UDP to the first host behind it; no firewall.

Namespaces are named ``pnl<pid>-<n>-<node>``; the pid lets ``cleanup_stale()`` tell a crashed run's
leftovers (pid dead) from a parallel run's live lab.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pilot_agents.daemon import process_alive

from .procs import JsonChild, LabError, LineReader

NatKind = Literal["cone", "symmetric", "full-cone"]
Direction = Literal["up", "down", "both"]

NS_PREFIX = "pnl"  # "pilot nat lab"; every namespace we create starts with it
_STALE_RE = re.compile(rf"^{NS_PREFIX}(\d+)-\d+-")
_instance_counter = itertools.count(1)
_log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
NATLAB_DIR = Path(__file__).resolve().parent

GATEWAY_IP = "192.0.2.1"  # TEST-NET-1: the internet router's address on every link
PUBLIC_NET = ipaddress.IPv4Network("198.51.100.0/24")  # TEST-NET-2: public hosts
NAT_WAN_NET = ipaddress.IPv4Network("203.0.113.0/24")  # TEST-NET-3: NAT routers' WAN addresses

DELAY_TABLE = 100  # routing table whose only route is "default dev <tun>"
DELAY_TUN = "dl0"
PREF_FROM_TUN = 100  # "iif dl0 lookup main": re-injected packets are routed normally
PREF_UP_BASE = 1000  # + link index: "iif wN lookup 100"
PREF_DOWN_BASE = 2000  # + link index: "to ADDR lookup 100"

REBIND_PORT_BASE = 10000  # rebind ranges lie below the ephemeral range 32768-60999, so a
REBIND_PORT_SPAN = 1000  # preserved source port can never fall inside one by chance
REBIND_RANGES = 22

CLONE_NEWNET = 0x40000000


# --------------------------------------------------------------------------------------------
# nodes


@dataclass(eq=False)
class Node:
    """Anything with a namespace: the internet router, a NAT router or a host."""

    name: str
    netns: str

    def __str__(self) -> str:
        return self.name


@dataclass(eq=False)
class Link:
    """A WAN link: a veth from a public host or NAT router to the internet router."""

    index: int
    inet_iface: str  # name on the inet side, "w<index>"
    addrs: tuple[str, ...]  # public addresses reached over it


@dataclass(eq=False)
class Nat(Node):
    kind: NatKind = "cone"
    public_ip: str = ""
    lan: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network("10.0.0.0/24"))
    link: Link | None = None
    hosts: list[Host] = field(default_factory=list)
    wan_iface: str = "wan0"
    lan_iface: str = "br0"
    rebinds: int = 0

    @property
    def lan_gateway(self) -> str:
        return str(self.lan.network_address + 1)


@dataclass(eq=False)
class Host(Node):
    ip: str = ""
    nat: Nat | None = None  # None: a public host
    link: Link | None = None  # public hosts only
    iface: str = "eth0"

    @property
    def is_public(self) -> bool:
        return self.nat is None


@dataclass(frozen=True)
class Impairment:
    """What the delay line does to one direction of a link (all zero: nothing)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # uniform extra delay in [0, jitter_ms]
    loss: float = 0.0  # probability 0..1
    reorder: float = 0.0  # probability that a packet is held reorder_gap_ms longer
    reorder_gap_ms: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        for name in ("delay_ms", "jitter_ms", "reorder_gap_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss or self.reorder)

    def params(self) -> dict[str, Any]:
        return {
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "loss": self.loss,
            "reorder": self.reorder,
            "reorder_gap_ms": self.reorder_gap_ms,
            "seed": self.seed,
        }


# --------------------------------------------------------------------------------------------
# commands


def sh(argv: Sequence[str], *, timeout: float = 20.0, check: bool = True) -> str:
    """Run a command in the root namespace; stdout, or LabError with its stderr."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(
            f"{argv[0]} not found; the NAT lab needs: apt-get install -y {REQUIRED_APT}"
        ) from None
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from None
    if check and res.returncode != 0:
        raise LabError(
            f"command failed (rc={res.returncode}): {' '.join(argv)}\n{res.stderr.strip()}"
        )
    return res.stdout


REQUIRED_APT = "iproute2 iptables conntrack tcpdump"


def iptables_binary() -> str:
    """The iptables to use: $NATLAB_IPTABLES, else iptables-nft, else iptables-legacy.

    Both backends work inside namespaces on this kernel (both are built in). We pin one explicitly
    rather than trusting the ``iptables`` alternative, so a lab never mixes nft and legacy rules.
    """
    forced = os.environ.get("NATLAB_IPTABLES")
    if forced:
        return forced
    for name in ("iptables-nft", "iptables-legacy", "iptables"):
        if shutil.which(name):
            return name
    raise LabError(f"no iptables binary; apt-get install -y {REQUIRED_APT}")


def list_netns() -> list[str]:
    # "ip netns list" prints "name (id: 3)" for namespaces that have an id.
    return [line.split()[0] for line in sh(["ip", "netns", "list"]).splitlines() if line.strip()]




def _kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs inside a namespace (it would keep the namespace alive)."""
    out = sh(["ip", "netns", "pids", netns], check=False)
    for tok in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(tok), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by crashed lab runs (owner pid dead); returns the names removed."""
    removed = []
    for ns in list_netns():
        m = _STALE_RE.match(ns)
        if not m or process_alive(int(m.group(1))):
            continue
        _kill_netns_processes(ns)
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


def _setns_thread(netns: str, fn: Any) -> Any:
    """Call ``fn()`` on a fresh thread that has entered ``netns`` (setns is per thread).

    Python 3.11 has no os.setns, hence ctypes. The thread ends afterwards, so the namespace switch
    never leaks into the caller; a socket created inside stays bound to that namespace for good.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            with open(f"/run/netns/{netns}", "rb") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    t = threading.Thread(target=worker, name=f"natlab-setns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------------------------
# captures


class Capture:
    """A running tcpdump; ``stop()`` (or leaving the ``with``) flushes and ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path, name: str) -> None:
        self.proc = proc
        self.path = path
        assert proc.stderr is not None
        self._err = LineReader(proc.stderr, name)

    def wait_listening(self, timeout: float) -> None:
        try:
            self._err.wait_for(lambda s: "listening on" in s, timeout)
        except LabError as e:
            raise LabError(f"{e}\ntcpdump said:\n{self._err.text()}") from None

    def stop(self, timeout: float = 5.0) -> int:
        """Stop capturing; the number of packets tcpdump says it captured (-1 if unknown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # SIGINT: tcpdump flushes and prints counts
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        time.sleep(0.05)  # let the reader thread see the final lines
        for line in self._err.lines:
            m = re.match(r"(\d+) packets? captured", line)
            if m:
                return int(m.group(1))
        return -1

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# the lab


class Lab:
    """Builds the namespaces; tears every one of them down on ``close()`` / leaving ``with``.

    >>> with Lab() as lab:
    ...     beacon = lab.add_public_host("beacon")
    ...     nat = lab.add_nat("home", "cone")
    ...     alice = lab.add_host_behind(nat, "alice")
    ...     proc = lab.python_cmd(alice, "pilot_agents.cli", ["--help"])
    """

    def __init__(self, *, clean_stale: bool = True) -> None:
        self.prefix = f"{NS_PREFIX}{os.getpid()}-{next(_instance_counter)}-"
        self.iptables = iptables_binary()
        self.inet = Node("inet", self.prefix + "inet")
        self.nodes: dict[str, Node] = {}
        self._clean_stale = clean_stale
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._own_group: set[int] = set()  # pids of children started in a session of their own
        self._links = itertools.count(1)
        self._public_ips = (str(a) for a in itertools.islice(PUBLIC_NET.hosts(), 1, None))
        self._nat_ips = (str(a) for a in itertools.islice(NAT_WAN_NET.hosts(), 1, None))
        self._nat_counter = itertools.count(1)
        self._delayline: JsonChild | None = None
        # node name -> (up, down) impairment currently set in the delay line
        self._impaired: dict[str, tuple[Impairment | None, Impairment | None]] = {}
        self._started = False
        self._closed = False

    # ---- lifecycle

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.close()
        except LabError:
            if exc_type is None:
                raise
            # the body's own exception is the one worth seeing; don't replace it
            _log.exception("NAT lab teardown failed while handling another error")

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._clean_stale:
            cleanup_stale()
        self._add_netns(self.inet.netns)
        self._sysctl(
            self.inet,
            {
                "net.ipv4.ip_forward": 1,
                # re-injected packets arrive on the tun device although their source is routed
                # via a WAN link: strict reverse-path filtering would drop every one of them
                "net.ipv4.conf.all.rp_filter": 0,
                "net.ipv4.conf.default.rp_filter": 0,
            },
        )

    def close(self) -> None:
        """Stop every process we started, then delete every namespace. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if self._delayline is not None:
            with contextlib.suppress(Exception):
                self._delayline.close(timeout=2.0)
        for proc in reversed(self._procs):
            self._stop_process(proc)
        for ns in reversed(self._namespaces):
            # a process we did not start (e.g. a grandchild that escaped its process group) would
            # keep the namespace alive after "ip netns del" -- kill whatever is still inside
            _kill_netns_processes(ns)
            try:
                sh(["ip", "netns", "del", ns])
            except LabError as e:
                errors.append(str(e))
        leftover = [ns for ns in list_netns() if ns.startswith(self.prefix)]
        if errors or leftover:
            raise LabError(f"lab teardown incomplete: {errors} leftover={leftover}")

    def _stop_process(self, proc: subprocess.Popen[bytes]) -> None:
        # A child in its own session leads a process group with its pid: signalling the group
        # also reaches anything it forked (a beacon's workers, say).
        def signal_it(sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                if proc.pid in self._own_group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)

        if proc.poll() is None:
            signal_it(signal.SIGTERM)
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                signal_it(signal.SIGKILL)
                proc.wait(3.0)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    # ---- low-level helpers

    def _add_netns(self, ns: str) -> None:
        sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])

    # Commands are written as one string, like the shell recipes in DESIGN.md; every token in
    # them is a validated name or an address, never anything with spaces.
    def _ip(self, node: Node, cmd: str) -> str:
        return sh(["ip", "-n", node.netns, *cmd.split()])

    def _in(self, node: Node, *argv: str, check: bool = True) -> str:
        return sh(["ip", "netns", "exec", node.netns, *argv], check=check)

    def _sysctl(self, node: Node, values: dict[str, object]) -> None:
        self._in(node, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items()))

    def _ipt(self, node: Node, cmd: str) -> None:
        self._in(node, self.iptables, "-w", *cmd.split())

    def _new_node_name(self, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,40}", name):
            raise ValueError(f"node name {name!r}: use 1-40 letters, digits, '_' or '.'")
        if name in self.nodes or name == "inet":
            raise ValueError(f"node name {name!r} is already used in this lab")
        return self.prefix + name

    def _require_started(self) -> None:
        if not self._started or self._closed:
            raise LabError("use the Lab inside 'with Lab() as lab:' (or call start())")

    def _wan_link(self, node: Node, iface: str, addr: str) -> Link:
        """A veth from ``node`` (``iface``, addr/32) to inet (``w<n>``); default route via inet."""
        idx = next(self._links)
        link = Link(index=idx, inet_iface=f"w{idx}", addrs=(addr,))
        # created directly in the two namespaces, never in the root one: a crash can't leave a
        # veth in the root namespace, and names only need to be unique per namespace
        peer = f"{link.inet_iface} netns {self.inet.netns}"
        self._ip(node, f"link add {iface} type veth peer name {peer}")
        self._ip(node, f"addr add {addr}/32 dev {iface}")
        self._ip(node, f"link set {iface} up")
        self._ip(node, f"route add {GATEWAY_IP} dev {iface} scope link")
        self._ip(node, f"route add default via {GATEWAY_IP} dev {iface}")
        self._ip(self.inet, f"addr add {GATEWAY_IP}/32 dev {link.inet_iface}")
        self._ip(self.inet, f"link set {link.inet_iface} up")
        self._ip(self.inet, f"route add {addr}/32 dev {link.inet_iface}")
        return link

    # ---- building

    def add_public_host(self, name: str) -> Host:
        """A host directly on the internet (the beacon, a public node)."""
        self._require_started()
        host = Host(name, self._new_node_name(name))
        self._add_netns(host.netns)
        host.ip = next(self._public_ips)
        host.link = self._wan_link(host, host.iface, host.ip)
        self.nodes[name] = host
        return host

    def add_nat(self, name: str, kind: NatKind = "cone", lan_subnet: str | None = None) -> Nat:
        """A NAT router on the internet with an empty LAN (bridge ``br0``).

        ``lan_subnet`` defaults to 10.<n>.0.0/24; give two NATs the same one (say 192.168.1.0/24)
        to test that colliding private candidates are not confused.
        """
        self._require_started()
        if kind not in ("cone", "symmetric", "full-cone"):
            raise ValueError(f"NAT kind {kind!r}: use 'cone', 'symmetric' or 'full-cone'")
        nat = Nat(name, self._new_node_name(name), kind=kind)
        nat.lan = ipaddress.IPv4Network(lan_subnet or f"10.{next(self._nat_counter)}.0.0/24")
        if nat.lan.prefixlen > 29:
            raise ValueError(f"LAN {nat.lan} is too small")
        self._add_netns(nat.netns)
        nat.public_ip = next(self._nat_ips)
        nat.link = self._wan_link(nat, nat.wan_iface, nat.public_ip)
        self._ip(nat, f"link add {nat.lan_iface} type bridge")
        self._ip(nat, f"addr add {nat.lan_gateway}/{nat.lan.prefixlen} dev {nat.lan_iface}")
        self._ip(nat, f"link set {nat.lan_iface} up")
        self._sysctl(
            nat,
            {
                "net.ipv4.ip_forward": 1,
                # br_netfilter is built into this kernel: without this, LAN-to-LAN frames on br0
                # would go through iptables/conntrack too, unlike on a real home router switch
                "net.bridge.bridge-nf-call-iptables": 0,
            },
        )
        self._write_nat_rules(nat)
        if kind != "full-cone":
            # the home-router firewall: nothing new comes in from the WAN
            for chain in ("INPUT", "FORWARD"):
                self._ipt(nat, f"-A {chain} -i {nat.wan_iface} -m conntrack --ctstate NEW -j DROP")
        self.nodes[name] = nat
        return nat

    def _write_nat_rules(self, nat: Nat, ports: tuple[int, int] | None = None) -> None:
        """(Re)write nat/POSTROUTING: MASQUERADE out of wan0, optionally into a port range."""
        self._ipt(nat, "-t nat -F POSTROUTING")
        extra = " --random-fully" if nat.kind == "symmetric" else ""
        rule = f"-t nat -A POSTROUTING -o {nat.wan_iface}"
        if ports is not None:
            # --to-ports needs a protocol; ICMP etc. keep the plain rule below
            for proto in ("udp", "tcp"):
                self._ipt(
                    nat, f"{rule} -p {proto} -j MASQUERADE --to-ports {ports[0]}-{ports[1]}{extra}"
                )
        self._ipt(nat, f"{rule} -j MASQUERADE{extra}")

    def add_host_behind(self, nat: Nat, name: str) -> Host:
        """A host on ``nat``'s LAN; two of them behind one NAT are the same-LAN scenario."""
        self._require_started()
        host = Host(name, self._new_node_name(name), nat=nat)
        self._add_netns(host.netns)
        n = len(nat.hosts) + 2  # .1 is the router
        addr = nat.lan.network_address + n
        if addr >= nat.lan.broadcast_address:
            raise LabError(f"LAN {nat.lan} of {nat.name} is full")
        host.ip = str(addr)
        lan_port = f"lan{n}"
        self._ip(host, f"link add {host.iface} type veth peer name {lan_port} netns {nat.netns}")
        self._ip(nat, f"link set {lan_port} master {nat.lan_iface}")
        self._ip(nat, f"link set {lan_port} up")
        self._ip(host, f"addr add {host.ip}/{nat.lan.prefixlen} dev {host.iface}")
        self._ip(host, f"link set {host.iface} up")
        self._ip(host, f"route add default via {nat.lan_gateway}")
        if nat.kind == "full-cone" and not nat.hosts:
            # endpoint-independent filtering for one host: whatever reaches the public address
            # goes to it, on the same port (MASQUERADE keeps source ports while it can)
            dnat = f"-j DNAT --to-destination {host.ip}"
            self._ipt(nat, f"-t nat -A PREROUTING -i {nat.wan_iface} -p udp {dnat}")
        nat.hosts.append(host)
        self.nodes[name] = host
        return host

    # ---- running things

    def node(self, name: str) -> Node:
        return self.inet if name == "inet" else self.nodes[name]

    def address(self, node: Node) -> str:
        """A host's own IP (LAN address behind a NAT); a NAT router's public IP."""
        if isinstance(node, Host):
            return node.ip
        if isinstance(node, Nat):
            return node.public_ip
        return GATEWAY_IP

    def run(self, node: Node, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``node``'s namespace; the lab stops it at teardown.

        The child gets its own session, so teardown can signal its whole process group. The venv's
        bin directory is put first on PATH, so console scripts (``pilot-agents``) are found.
        """
        self._require_started()
        env = dict(popen_kwargs.pop("env", None) or os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
        popen_kwargs["env"] = env
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, *argv], **popen_kwargs
        )
        self._procs.append(proc)
        if popen_kwargs["start_new_session"]:
            self._own_group.add(proc.pid)
        return proc

    def exec(self, node: Node, argv: Sequence[str], timeout: float = 20.0) -> str:
        """Run ``argv`` in ``node``'s namespace to completion; its stdout (LabError on failure)."""
        self._require_started()
        return sh(["ip", "netns", "exec", node.netns, *argv], timeout=timeout)

    @staticmethod
    def python_argv(module_or_script: str, args: Sequence[str] = ()) -> list[str]:
        """argv for the venv's interpreter: a path ending in .py runs as a script, else ``-m``."""
        if module_or_script == "-m":
            raise ValueError("pass the module name itself, e.g. 'pilot_agents.beacon'")
        if module_or_script.endswith(".py") or os.sep in module_or_script:
            return [sys.executable, module_or_script, *args]
        return [sys.executable, "-m", module_or_script, *args]

    def python_cmd(
        self,
        node: Node,
        module_or_script: str,
        args: Sequence[str] = (),
        **popen_kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start a Python module or script with the venv's interpreter inside ``node``.

        The repository root is put on PYTHONPATH (so ``tests.natlab.*`` and ``pilot_agents``
        import without installing) and output is unbuffered (so readiness lines arrive at once).
        """
        env = dict(popen_kwargs.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        return self.run(node, self.python_argv(module_or_script, args), env=env, **popen_kwargs)

    def socket(
        self,
        node: Node,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_DGRAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket in the test process itself, but living in ``node``'s namespace."""
        self._require_started()
        sock: socket.socket = _setns_thread(node.netns, lambda: socket.socket(family, type, proto))
        return sock

    # ---- NAT state

    def flush_conntrack(self, node: Node) -> None:
        """Forget every connection (so every NAT mapping) in ``node``'s namespace."""
        self._in(node, "conntrack", "-F")

    def rebind(self, nat: Nat) -> tuple[int, int]:
        """NAT rebinding: new MASQUERADE port range, then forget all mappings.

        Each call uses the next 1000-port range below the ephemeral range, so the same host (even
        the same socket) is mapped to a port it never had. Returns the range.
        """
        lo = REBIND_PORT_BASE + REBIND_PORT_SPAN * (nat.rebinds % REBIND_RANGES)
        ports = (lo, lo + REBIND_PORT_SPAN - 1)
        nat.rebinds += 1
        # rules first: a packet slipping in between would otherwise recreate an old mapping
        self._write_nat_rules(nat, ports)
        self.flush_conntrack(nat)
        return ports

    def set_udp_timeout(self, nat: Node, seconds: int) -> None:
        """UDP mapping lifetime in ``nat`` (both the one-way and the 'stream' timeout)."""
        self._sysctl(
            nat,
            {
                "net.netfilter.nf_conntrack_udp_timeout": int(seconds),
                "net.netfilter.nf_conntrack_udp_timeout_stream": int(seconds),
            },
        )

    # ---- impairment

    def _link_of(self, target: Node) -> Link:
        link = getattr(target, "link", None)
        if link is None:
            raise ValueError(
                f"{target.name} has no WAN link: impair a public host or a NAT router "
                "(a host behind a NAT shares its router's link)"
            )
        assert isinstance(link, Link)
        return link

    def _ensure_delayline(self) -> JsonChild:
        if self._delayline is not None:
            if self._delayline.proc.poll() is not None:
                raise LabError(
                    f"the delay line died (rc={self._delayline.proc.returncode}):\n"
                    f"{self._delayline.err.text()}"
                )
            return self._delayline
        # A persistent tun created by ip: if the delay line dies, routes to it stay but packets
        # are dropped -- a loud failure, instead of a silently unimpaired link.
        self._ip(self.inet, f"tuntap add dev {DELAY_TUN} mode tun")
        # with the default queue (500), a back-to-back burst of 3000 datagrams lost ~400 here
        self._ip(self.inet, f"link set {DELAY_TUN} txqueuelen 10000 up")
        self._sysctl(self.inet, {f"net.ipv4.conf.{DELAY_TUN}.rp_filter": 0})
        self._ip(self.inet, f"route add default dev {DELAY_TUN} table {DELAY_TABLE}")
        self._ip(self.inet, f"rule add pref {PREF_FROM_TUN} iif {DELAY_TUN} lookup main")
        proc = self.python_cmd(
            self.inet,
            str(NATLAB_DIR / "delayline.py"),
            ["--tun", DELAY_TUN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        child = JsonChild(proc, "delayline")
        self._delayline = child
        ready = child.receive(timeout=10.0)
        if not ready.get("ready"):
            raise LabError(f"delay line did not start: {ready}")
        return child

    def impair(
        self,
        target: Node,
        delay_ms: float = 0.0,
        loss: float = 0.0,
        reorder: float = 0.0,
        seed: int = 0,
        *,
        jitter_ms: float = 0.0,
        reorder_gap_ms: float = 10.0,
        direction: Direction = "both",
    ) -> None:
        """Impair ``target``'s WAN link (a public host or NAT router) in the userspace delay line.

        ``direction``: "up" = packets entering the internet from this link, "down" = packets
        leaving the internet into it, "both" (default). A packet between two impaired links gets
        the sender's "up" and the receiver's "down" (delays add; each may drop it). Calling again
        replaces the link's setting; all-zero arguments clear it.
        """
        self._require_started()
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction {direction!r}: use 'up', 'down' or 'both'")
        link = self._link_of(target)
        imp = Impairment(
            delay_ms=delay_ms,
            jitter_ms=jitter_ms,
            loss=loss,
            reorder=reorder,
            reorder_gap_ms=reorder_gap_ms,
            seed=seed,
        )
        if not imp.active:
            self.clear_impairment(target)
            return
        up = imp if direction in ("up", "both") else None
        down = imp if direction in ("down", "both") else None
        dl = self._ensure_delayline()
        self._remove_impair_rules(link)
        dl.call(
            {
                "op": "set",
                "link": target.name,
                "addrs": list(link.addrs),
                "up": up.params() if up else None,
                "down": down.params() if down else None,
            },
            timeout=5.0,
        )
        # the delay line knows the link before any packet of it is routed there
        if up:
            pref = PREF_UP_BASE + link.index
            self._ip(self.inet, f"rule add pref {pref} iif {link.inet_iface} lookup {DELAY_TABLE}")
        if down:
            pref = PREF_DOWN_BASE + link.index
            for addr in link.addrs:
                self._ip(self.inet, f"rule add pref {pref} to {addr}/32 lookup {DELAY_TABLE}")
        self._impaired[target.name] = (up, down)

    def clear_impairment(self, target: Node) -> None:
        link = self._link_of(target)
        if self._impaired.pop(target.name, None) is None:
            return
        self._remove_impair_rules(link)
        if self._delayline is not None:
            self._delayline.call({"op": "clear", "link": target.name}, timeout=5.0)

    def _remove_impair_rules(self, link: Link) -> None:
        for pref in (PREF_UP_BASE + link.index, PREF_DOWN_BASE + link.index):
            # "ip rule del pref N" removes one rule per call and fails once none is left
            for _ in range(len(link.addrs) + 1):
                res = subprocess.run(
                    ["ip", "-n", self.inet.netns, "rule", "del", "pref", str(pref)],
                    capture_output=True,
                    check=False,
                    timeout=10,
                )
                if res.returncode != 0:
                    break

    def delayline_stats(self) -> dict[str, Any]:
        """Per-link counters of the delay line (packets seen/dropped per direction)."""
        if self._delayline is None:
            return {}
        return self._delayline.call({"op": "stats"}, timeout=5.0)

    # ---- observation

    def capture(
        self, node: Node, iface: str, path: str | os.PathLike[str], bpf: Sequence[str] = ()
    ) -> Capture:
        """tcpdump ``iface`` in ``node``'s namespace into ``path`` until ``stop()``.

        Returns once tcpdump is listening, so nothing sent afterwards is missed. ``-Z root``: as
        root, tcpdump would otherwise drop to user tcpdump and fail to write into a root-only dir.
        """
        self._require_started()
        p = Path(path)
        proc = self.run(
            node,
            [
                "tcpdump",
                "-i",
                iface,
                "-Z",
                "root",
                "-n",
                "-U",
                "--immediate-mode",
                "-w",
                str(p),
                *bpf,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cap = Capture(proc, p, f"tcpdump@{node.name}:{iface}")
        cap.wait_listening(timeout=10.0)
        return cap

    def describe(self) -> str:
        """One line per node, for failure messages."""
        rows = [f"inet {self.inet.netns} gw={GATEWAY_IP}"]
        for n in self.nodes.values():
            if isinstance(n, Nat):
                rows.append(f"nat {n.name} kind={n.kind} wan={n.public_ip} lan={n.lan}")
            elif isinstance(n, Host):
                where = "public" if n.nat is None else f"behind {n.nat.name}"
                rows.append(f"host {n.name} {n.ip} {where}")
            if n.name in self._impaired:
                up, down = self._impaired[n.name]
                rows.append(f"  impaired up={up} down={down}")
        return "\n".join(rows)

    def conntrack_table(self, node: Node) -> str:
        return self._in(node, "conntrack", "-L", check=False)


def iter_lab_namespaces() -> Iterator[str]:
    """Every namespace with our prefix (any run), for leak checks."""
    return (ns for ns in list_netns() if ns.startswith(NS_PREFIX))
