"""``lowband dht``: a bootstrap peer for serverless runs. It only runs a hivemind DHT (and its p2pd) that nodes
name in ``--initial-peers``; it trains nothing and holds no run state beyond the DHT records it stores. It stores
only records their writer's key signed (``dht_signing``: it validates, it never signs), and its DHT process and
p2pd die with it, ``kill -9`` included (``dht_process``)."""
from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from typing import Any, Sequence

log = logging.getLogger(__name__)
PEER_PREFIX = "lowband dht peer "


def is_loopback(maddrs: Sequence[str]) -> bool:
    """True when every listen multiaddr is on loopback (``/ip4/127.0.0.1/...``): then NAT traversal is off by
    default, so a test touches nothing but 127.0.0.1 (dependencies.md, hivemind's network hygiene)."""
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            return False
        try:
            if not ipaddress.ip_address(parts[2]).is_loopback:
                return False
        except ValueError:
            return False
    return bool(maddrs)


def nat_enabled(listen: Sequence[str], no_nat: bool) -> bool:
    """hivemind's NAT traversal (nat_port_map, auto_nat, use_relay): on, as hivemind defaults, unless asked
    off or listening on loopback only."""
    return not no_nat and not is_loopback(listen)


def run_dht_peer(listen: Sequence[str], initial_peers: Sequence[str], identity_path: str | None,
                 no_nat: bool, client_mode: bool = False, announce: Sequence[str] = ()) -> int:
    from node.transport.dht_control import default_signals  # late: the other subcommands do not need hivemind
    from node.transport.dht_process import start_dht
    from node.transport.dht_signing import SignedRecordValidator

    nat = nat_enabled(listen, no_nat)
    extra: dict[str, Any] = {"identity_path": identity_path} if identity_path else {}
    if announce:
        extra["announce_maddrs"] = list(announce)
    with default_signals():  # the DHT's forked process must die on SIGTERM, not inherit our handler
        dht = start_dht(initial_peers=list(initial_peers), host_maddrs=list(listen), nat_port_map=nat, auto_nat=nat,
                        use_relay=nat, client_mode=client_mode, record_validators=[SignedRecordValidator()], **extra)
    dht.wait_until_ready()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for maddr in dht.get_visible_maddrs():
            print(f"{PEER_PREFIX}{maddr}", flush=True)  # tests and operators read these lines
        log.info("DHT peer up (NAT traversal %s); SIGTERM or Ctrl-C stops it", "on" if nat else "off")
        while not stop.wait(1.0):
            if not dht.is_alive():
                log.error("the DHT process died")
                return 1
        return 0
    finally:
        dht.shutdown()  # stops the DHT process and its p2pd: nothing is left behind
