"""Network namespaces: each emulated host gets its own namespace, address and ``tc``-shaped link.

    root namespace:  bridge <prefix>br (10.77.0.1/24) ── veth <prefix><i>h ──┐
    namespace <prefix>-<host>:  eth0 (10.77.0.<i+2>/24) ─────────────────────┘, lo

Bandwidth is shaped by the kernel with ``tc tbf`` on both ends of the host's veth: egress of ``eth0`` inside the
namespace is the host's uplink, egress of the root-side end its downlink. This kernel has no ``netem``, so
latency, jitter, loss and outages are added by a ``Link`` (node/netem/link.py) that listens on the bridge
address in the root namespace and forwards to the target host: processes in a namespace dial the relay, which
dials the target — each direction crosses the sender's shaped veth.

Needs root (CAP_NET_ADMIN) and ``ip``/``tc``; ``available()`` says why not where they are missing, and callers
fall back to loopback + the user-space link (which then shapes bandwidth too).
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def available() -> tuple[bool, str]:
    """(True, "") if namespaces and veths can be made here, else (False, why)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` is not installed"
    probe = "lbprobe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    try:
        veth = _ip("link", "add", "lbprobe0", "type", "veth", "peer", "name", "lbprobe1", check=False)
        if veth.returncode != 0:
            return False, f"cannot create a veth pair: {veth.stderr.strip()}"
        _ip("link", "del", "lbprobe0", check=False)
        return True, ""
    finally:
        _ip("netns", "del", probe, check=False)


def _tbf(dev: str, rate_bps: float, netns: str | None = None) -> None:
    if rate_bps <= 0:
        return
    burst = max(32 << 10, int(rate_bps / 8 / 100))  # 10 ms of traffic, at least 32 KiB
    cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst),
           "latency", "400ms"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)


@dataclass
class Topology:
    """Hosts on one bridge. ``add_host`` returns the host's address; ``prefix_cmd`` runs a command inside it."""

    prefix: str = "lb"
    subnet: str = "10.77.0"
    hosts: dict[str, int] = field(default_factory=dict)  # name → index
    bridge_up: bool = False

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts[host] + 2}"

    def clear_stale(self) -> None:
        """Remove namespaces and links with this prefix left by a run that was killed before its teardown."""
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.prefix}-"):
                _ip("netns", "del", name, check=False)
        for line in _ip("-o", "link", check=False).stdout.splitlines():
            parts = line.split(": ")
            dev = parts[1].split("@")[0] if len(parts) > 1 else ""
            if dev.startswith(self.prefix) and (dev == self.bridge or dev[len(self.prefix):-1].isdigit()):
                _ip("link", "del", dev, check=False)

    def _bridge(self) -> None:
        if self.bridge_up:
            return
        self.clear_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.bridge_up = True

    def add_host(self, host: str, up_bps: float = 0.0, down_bps: float = 0.0) -> str:
        """A namespace with one veth on the bridge, shaped to ``up_bps``/``down_bps`` (0: unshaped)."""
        self._bridge()
        index = len(self.hosts)
        if index > 250:
            raise ValueError("at most 250 hosts per topology")
        self.hosts[host] = index
        ns, outside, inside = self.ns(host), f"{self.prefix}{index}h", f"{self.prefix}{index}n"
        _ip("netns", "add", ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        for args in (("link", "set", "lo", "up"), ("link", "set", inside, "name", "eth0"),
                     ("addr", "add", f"{self.address(host)}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                     ("route", "add", "default", "via", self.gateway)):
            _ip("netns", "exec", ns, "ip", *args)
        _tbf("eth0", up_bps, ns)  # what the host sends
        _tbf(outside, down_bps)  # what the host receives
        log.info("host %s: %s in namespace %s (up %s, down %s bit/s)", host, self.address(host), ns, up_bps or "∞",
                 down_bps or "∞")
        return self.address(host)

    def set_up(self, host: str, up: bool) -> None:
        """Take the host's veth down (every packet to or from it is lost: a partition) or bring it back."""
        _ip("link", "set", f"{self.prefix}{self.hosts[host]}h", "up" if up else "down")

    def prefix_cmd(self, host: str) -> list[str]:
        """Prepend this to an argv to run it inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host)]

    def teardown(self) -> None:
        for host, index in list(self.hosts.items()):
            _ip("netns", "del", self.ns(host), check=False)  # deletes the inside end, and so the pair
            _ip("link", "del", f"{self.prefix}{index}h", check=False)
        self.hosts.clear()
        if self.bridge_up:
            _ip("link", "del", self.bridge, check=False)
            self.bridge_up = False

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()
