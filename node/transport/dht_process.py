"""A hivemind DHT process that dies with the process that started it, and takes its p2pd along.

hivemind runs a DHT in a forked process, which starts the libp2p daemon (``p2pd``) as its own child. When the node
that started them is killed (``kill -9``, the OOM killer) nothing tells either of them: both are re-parented to PID 1
and keep serving for a long while (dependencies.md). ``DhtProcess`` fixes that in the forked process, before hivemind
starts anything in it:

1. it becomes the leader of a new process group, which the p2pd it starts inherits, so one ``killpg`` ends both
   (and a Ctrl-C or a group SIGTERM meant for the node no longer reaches it: the node shuts it down in order);
2. it asks the kernel for SIGUSR1 when its parent dies (``PR_SET_PDEATHSIG``), and kills the group on it. The
   kernel ties the death signal to the parent *thread* that forked, so the handler checks that the parent *process*
   is gone. A Python handler runs only when the process's event loop wakes (hivemind wakes it every few seconds), so
   a watchdog thread also checks four times a second whether the parent process is gone (which also covers systems
   without ``prctl``): the group goes within a fraction of a second;
3. SIGTERM — what ``hivemind.DHT.shutdown`` falls back to when a graceful shutdown hangs — kills the group too, so
   p2pd goes with it.

No signal is blocked, so the p2pd it starts inherits an ordinary signal mask and still stops on SIGTERM.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from typing import Any

import hivemind

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
WATCH_S = 0.25  # how often the watchdog checks that the parent process lives (a getppid call)


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: the watchdog's poll still works
        return False


def _end_group() -> None:
    """Kill this process's group (this process and its p2pd) if it leads one, else just this process."""
    if os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # the parent process died (we were re-parented)
            _end_group()
        threading.Event().wait(WATCH_S)  # a watchdog's period, not a synchronisation


def die_with_parent(parent: int) -> None:
    """Call first thing in a forked child: from then on the child and everything it starts die when ``parent`` does."""
    try:
        os.setpgid(0, 0)
    except OSError as exc:  # e.g. already a session leader: the handlers still end this process
        log.debug("setpgid failed: %r", exc)

    def on_parent_death(_sig: int, _frame: Any) -> None:
        if os.getppid() != parent:  # not the death of the forking thread alone
            _end_group()

    signal.signal(signal.SIGUSR1, on_parent_death)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: _end_group())
    _set_parent_death_signal(signal.SIGUSR1)
    threading.Thread(target=_watch, args=(parent,), name="die-with-parent", daemon=True).start()
    if os.getppid() != parent:  # it died before the death signal was set
        _end_group()


class DhtProcess(hivemind.DHT):
    """``hivemind.DHT`` whose process (and its p2pd) dies with the process that created it."""

    def run(self) -> None:
        die_with_parent(self._parent_pid)
        super().run()


def start_dht(**kwargs: Any) -> hivemind.DHT:
    """``DhtProcess(**kwargs)`` started in the background; the caller waits for it (``wait_until_ready``)."""
    return DhtProcess(start=True, await_ready=False, **kwargs)
