"""Link profiles as data. Latencies are round-trip times (what ``ping`` shows); the link applies half of it in
each direction. ``up``/``down`` are from the node's side: ``up`` carries its payload uploads."""
from __future__ import annotations

import dataclasses
import math

from node.netem.link import LinkProfile

MBIT = 1e6

PROFILES: dict[str, LinkProfile] = {
    p.name: p for p in (
        LinkProfile("loopback"),
        LinkProfile("datacenter", up_bps=1000 * MBIT, down_bps=1000 * MBIT, latency_s=0.0005),
        LinkProfile("cross-region", up_bps=100 * MBIT, down_bps=100 * MBIT, latency_s=0.040, jitter_s=0.002),
        LinkProfile("home", up_bps=10 * MBIT, down_bps=50 * MBIT, latency_s=0.020, jitter_s=0.003, loss=0.005),
        LinkProfile("bad", up_bps=2 * MBIT, down_bps=2 * MBIT, latency_s=0.150, jitter_s=0.030, loss=0.02,
                    outage_every_s=60.0, outage_s=5.0),
    )
}


def get_profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def between_hosts(p: LinkProfile) -> LinkProfile:
    """The path between two hosts that both sit behind access link ``p``, less its bandwidth (the kernel shapes
    each host's veth): both links' latency and loss, jitter adding as independent noise, ``p``'s outages."""
    return dataclasses.replace(p, name=f"{p.name}×2", up_bps=0.0, down_bps=0.0, latency_s=2 * p.latency_s,
                               jitter_s=math.sqrt(2) * p.jitter_s, loss=1 - (1 - p.loss) ** 2)


def describe(p: LinkProfile) -> str:
    def rate(bps: float) -> str:
        return "∞" if not bps else f"{bps / MBIT:g} Mbit/s"
    parts = [f"up {rate(p.up_bps)}", f"down {rate(p.down_bps)}", f"RTT {2 * p.latency_s * 1000:g} ms"]
    if p.jitter_s:
        parts.append(f"±{p.jitter_s * 1000:g} ms")
    if p.loss:
        parts.append(f"loss {p.loss * 100:g}%")
    if p.outage_every_s:
        parts.append(f"{p.outage_s:g} s outage every {p.outage_every_s:g} s")
    return f"{p.name}: " + ", ".join(parts)
