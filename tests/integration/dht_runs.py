"""Serverless runs for the multi-process tests: run files signed by an authority (as ``lowband run init`` signs
them), grants for nodes (as ``lowband run grant`` writes them), a run file edited after signing, and the processes a
node leaves behind."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from node.identity import NodeKey
from node.runfile import load_run_file
from node.transport.dht_authority import GRANT_FILE, grant_text, sign_run_text

from lowband_cluster import Cluster, write_run_file


def signed_run(path: Path, *, open_run: bool = False, **kw: Any) -> Path:
    """``write_run_file(path, **kw)``, signed by an authority whose key is kept next to it (``authority_key``)."""
    write_run_file(path, **kw)
    key = NodeKey.load_or_create(path.parent, authority_key(path).name)
    path.write_text(sign_run_text(path.read_text(), key, open_run=open_run, source=str(path)))
    return path


def authority_key(run: Path) -> Path:
    return run.with_suffix(".authority.key")


def grant(cluster: Cluster, run: Path, name: str) -> Path:
    """The run's grant for the node ``name`` of ``cluster`` (its workdir's key, created here)."""
    workdir = cluster.root / name
    key = NodeKey.load_or_create(workdir)
    authority = NodeKey.load_or_create(run.parent, authority_key(run).name)
    (workdir / GRANT_FILE).write_text(grant_text(load_run_file(run), authority, key.public, name))
    return workdir


def edited(run: Path, out: Path, **kw: Any) -> Path:
    """A run file with ``kw`` changed but ``run``'s [authority] section: an edit made after signing."""
    write_run_file(out, **kw)
    section = run.read_text().split("\n[authority]\n", 1)[1]
    out.write_text(out.read_text() + "\n[authority]\n" + section)
    return out


def descendants(pid: int) -> set[int]:
    """Every process under ``pid`` (by /proc parent links), alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a dead child not yet reaped by whoever inherited it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
