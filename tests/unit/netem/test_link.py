"""The emulated link (a user-space TCP relay on 127.0.0.1): bytes arrive intact and in order whatever the profile,
every byte is counted in its direction, a black-holed link delivers nothing until it comes back, and a cut
resets open connections while new ones still pass."""
from __future__ import annotations

import os
import select
import socket
import threading
from typing import Iterator

import pytest

from node.netem.link import Link, LinkProfile
from node.netem.profiles import PROFILES, describe, get_profile

BOUND_S = 30.0


class Echo:
    """A TCP echo server on 127.0.0.1:0, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


def link_to(echo: Echo, profile: LinkProfile) -> Link:
    link = Link(("127.0.0.1", echo.port), profile, seed=7)
    link.start()
    return link


def roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) as s:
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = s.recv(65536)
            assert chunk, "connection closed early"
            got += chunk
        sender.join(BOUND_S)
        return bytes(got)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("profile", [
    LinkProfile("plain"),
    LinkProfile("shaped", up_bps=80e6, down_bps=40e6, latency_s=0.005, jitter_s=0.004, loss=0.05),
])
def test_bytes_arrive_intact_in_order_and_are_counted(echo: Echo, profile: LinkProfile) -> None:
    link = link_to(echo, profile)
    try:
        data = os.urandom(700_000)
        assert roundtrip(link.port, data) == data
        assert roundtrip(link.port, data[:1000]) == data[:1000]  # a second connection through the same link
        assert link.stats()["bytes_up"] == link.stats()["bytes_down"] == 701_000
    finally:
        link.stop()


@pytest.mark.timeout(60)
def test_a_black_holed_link_delivers_nothing_until_it_is_back(echo: Echo) -> None:
    link = link_to(echo, LinkProfile("flaky"))
    try:
        with socket.create_connection(("127.0.0.1", link.port), timeout=BOUND_S) as s:
            s.sendall(b"before")
            assert s.recv(100) == b"before"
            link.set_down(True)
            s.sendall(b"during")
            readable, _, _ = select.select([s], [], [], 0.5)
            assert not readable, "bytes crossed a link that is down"
            link.set_down(False)
            got = b""
            while len(got) < 6:
                got += s.recv(100)
            assert got == b"during"
    finally:
        link.stop()


@pytest.mark.timeout(60)
def test_a_cut_resets_open_connections_and_new_ones_pass(echo: Echo) -> None:
    link = link_to(echo, LinkProfile("partition"))
    try:
        with socket.create_connection(("127.0.0.1", link.port), timeout=BOUND_S) as s:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            link.cut()
            try:
                assert s.recv(10) == b""  # EOF or reset: the connection is gone either way
            except ConnectionResetError:
                pass
        assert roundtrip(link.port, b"again") == b"again"
    finally:
        link.stop()


def test_profiles_are_valid_data() -> None:
    assert {"datacenter", "cross-region", "home", "bad"} <= set(PROFILES)
    home = get_profile("home")
    assert home.up_bps == 10e6 and home.loss == 0.005 and 2 * home.latency_s == pytest.approx(0.040)
    assert "outage" in describe(get_profile("bad"))
    with pytest.raises(ValueError, match="unknown link profile"):
        get_profile("moon")
    for bad in ({"loss": 1.0}, {"up_bps": -1.0}, {"outage_every_s": 5.0, "outage_s": 6.0}):
        with pytest.raises(ValueError):
            LinkProfile("bad", **bad)
