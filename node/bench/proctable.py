"""Which processes belong to us: a walk over ``/proc`` (Linux), so that a check for leftovers (a p2pd that
outlived its node) sees only this run's processes, never another run's on the same machine.

A process is ours by any of three signs. Its parent chain reaches a root of ours (``under``). An orphan — its
parent died, e.g. a p2pd whose node was killed — is re-parented to init and leaves every chain; it keeps its
session, though, and each ``lowband`` child that tools and tests start leads a session of its own
(``start_new_session``): pass their pids as ``sessions``. And it inherits its environment: a marker variable set
for the children of one run (``environ``) tells that run's processes apart wherever they moved (in-process
DHTs, whose p2pd share the test process's session, need it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    ppid: int
    session: int
    comm: str  # the executable's name as the kernel keeps it (at most 15 characters)
    state: str  # "R", "S", ..., "Z" (exited, not yet reaped)


def _parse_stat(text: str) -> ProcessEntry:
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses, so split at the last ")"
    head, _, rest = text.rpartition(")")
    pid, _, comm = head.partition(" (")
    fields = rest.split()
    return ProcessEntry(pid=int(pid), ppid=int(fields[1]), session=int(fields[3]), comm=comm, state=fields[0])


def process_table(proc_root: str = "/proc") -> dict[int, ProcessEntry]:
    """Every process visible now, by pid (processes that exit during the walk are left out)."""
    table: dict[int, ProcessEntry] = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, name, "stat")) as f:
                entry = _parse_stat(f.read())
        except (OSError, ValueError, IndexError):  # gone meanwhile, or unreadable
            continue
        table[entry.pid] = entry
    return table


def descendants(root: int, table: dict[int, ProcessEntry] | None = None) -> set[int]:
    """The pids whose parent chain reaches ``root`` (``root`` excluded)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for e in table.values():
        children.setdefault(e.ppid, []).append(e.pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def has_environ(pid: int, environ: Mapping[str, str], proc_root: str = "/proc") -> bool:
    """Whether process ``pid`` started with every ``NAME=VALUE`` of ``environ`` (False when it is gone or its
    environment is not ours to read)."""
    try:
        with open(os.path.join(proc_root, str(pid), "environ"), "rb") as f:
            held = set(f.read().split(b"\0"))
    except OSError:
        return False
    return all(f"{k}={v}".encode() in held for k, v in environ.items())


def find_processes(comm: str, *, under: int | None = None, sessions: Iterable[int] = (),
                   environ: Mapping[str, str] | None = None, table: dict[int, ProcessEntry] | None = None) -> set[int]:
    """Live processes named ``comm`` that are ours by any sign given (see the module docstring): they descend from
    ``under``, sit in one of ``sessions``, or carry every variable of ``environ``. Zombies do not count: they have
    exited."""
    table = process_table() if table is None else table
    ours = descendants(under, table) if under is not None else set()
    wanted = set(sessions)
    named = [e for e in table.values() if e.comm == comm and e.state != "Z"]
    return {e.pid for e in named
            if e.pid in ours or e.session in wanted or (environ and has_environ(e.pid, environ))}


def p2pd_processes(under: int | None = None, sessions: Iterable[int] = (),
                   environ: Mapping[str, str] | None = None) -> set[int]:
    """hivemind's p2pd daemons of ours: ``find_processes("p2pd", ...)``."""
    return find_processes("p2pd", under=under, sessions=sessions, environ=environ)
