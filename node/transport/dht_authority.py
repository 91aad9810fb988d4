"""``lowband run init`` / ``run grant`` / ``run key``: a serverless run's authority, on files.

- ``init_run``: a template run file → the run file with ``[authority]`` (public key, its signature of the run record,
  open or closed), and the authority's private key (PEM, mode 0600; reused when it exists, so a run can be signed
  again after its template changed). Signing needs the run record's task fingerprint and model digest, so this builds
  the task and the model once, as a node does at join.
- ``grant_text`` / ``load_grant``: a grant (``grant.toml`` in the node's workdir): run id, name, the node's public key
  and the authority's signature over the three.

The rules these files feed are in ``dht_trust``; the node checks its run file and grant at join (``dht_control``).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from node.errors import ConfigError
from node.fsutil import write_atomic
from node.identity import PUBLIC_BYTES, SIGNATURE_BYTES, NodeKey
from node.runfile import RunFile, parse_run_file
from node.transport.dht_trust import RunAuthority, grant_message, make_grant, run_record

GRANT_FILE = "grant.toml"
HEADER = ("# lowband run file, signed by `lowband run init` (the [authority] section): edit the template and run it\n"
          "# again rather than this file, whose signature covers the run (format: deploy/README.md).\n")


def run_identity(run_file: RunFile) -> tuple[str, str]:
    """(task fingerprint, model digest) of a run, computed as a node computes them when it joins."""
    from node import wire
    from node.tasks import load_task
    from node.tasks.base import build_seeded
    from node.train.reference import model_digest

    cfg = run_file.run
    task = load_task(cfg.task.name, **cfg.task.params)
    probe = build_seeded(task, cfg.seed)
    return task.fingerprint, model_digest(wire.model_spec([(n, p) for n, p in probe.named_parameters()
                                                           if p.requires_grad]))


def signed_record(run_file: RunFile, open_run: bool) -> str:
    task_fingerprint, digest = run_identity(run_file)
    mp = run_file.membership
    return run_record(run_file.run.to_dict(), task_fingerprint, digest, num_shards=mp.max_nodes,
                      min_nodes=mp.min_nodes, open_run=open_run, sharding=run_file.dht_record())


def sign_run_text(text: str, authority: NodeKey, *, open_run: bool = False, run_id: str | None = None,
                  source: str = "run file") -> str:
    """``text`` (a run file) with its ``[authority]`` section (re)written by ``authority``; ``run_id`` replaces
    ``[run] id``."""
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    doc.pop("authority", None)
    if run_id is not None:
        doc.setdefault("run", {})["id"] = run_id
    plain = tomli_w.dumps(doc)
    run_file = parse_run_file(plain, source)
    record = signed_record(run_file, open_run)
    signature = RunAuthority.sign(authority, run_file.run.run_id, record)
    doc["authority"] = RunAuthority(authority.public, signature, open_run).section()
    return HEADER + tomli_w.dumps(doc)


@dataclass(frozen=True)
class InitResult:
    run_id: str
    run_path: Path
    key_path: Path
    key_id: str
    created_key: bool


def init_run(template: Path, out: Path, key_path: Path, *, open_run: bool = False,
             run_id: str | None = None) -> InitResult:
    try:
        text = template.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the template {template}: {exc}") from None
    created = not key_path.exists()
    authority = NodeKey.load_or_create(key_path.parent, key_path.name)
    signed = sign_run_text(text, authority, open_run=open_run, run_id=run_id, source=str(template))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, signed)
    return InitResult(parse_run_file(signed, str(out)).run.run_id, out, key_path, authority.key_id, created)


# -- grants -------------------------------------------------------------------------------------------------
def grant_text(run_file: RunFile, authority: NodeKey, public: bytes, name: str) -> str:
    """A node's grant file, after checking that ``authority`` is the run file's."""
    section = RunAuthority.from_section(run_file.authority)
    if section.public != authority.public:
        raise ConfigError(f"that key (id {authority.key_id}) is not this run's authority (id {section.key_id})")
    if len(public) != PUBLIC_BYTES:
        raise ConfigError(f"a node's public key is {PUBLIC_BYTES * 2} hex characters (`lowband run key`)")
    run_id = run_file.run.run_id
    signature = make_grant(authority, run_id, public, name)
    return tomli_w.dumps({"grant": {"run": run_id, "name": name, "public_key": public.hex(),
                                    "signature": signature.hex()}})


@dataclass(frozen=True)
class Grant:
    run_id: str
    name: str
    public: bytes
    signature: bytes


def load_grant(path: Path) -> Grant | None:
    """The grant in ``path`` (None when there is none); ConfigError when it is not a well-formed grant."""
    if not path.exists():
        return None
    try:
        doc = tomllib.loads(path.read_text()).get("grant", {})
        grant = Grant(str(doc["run"]), str(doc["name"]), bytes.fromhex(doc["public_key"]),
                      bytes.fromhex(doc["signature"]))
    except (OSError, tomllib.TOMLDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a grant (`lowband run grant` writes one): {exc!r}") from None
    if len(grant.public) != PUBLIC_BYTES or len(grant.signature) != SIGNATURE_BYTES:
        raise ConfigError(f"{path}: a grant's public_key and signature are 64 and 128 hex characters")
    return grant


def check_grant(grant: Grant, authority: RunAuthority, run_id: str, key: NodeKey, path: Path) -> None:
    """ConfigError unless ``grant`` lets ``key`` join run ``run_id`` (signed by the run's authority)."""
    from node.identity import verify

    if grant.run_id != run_id:
        raise ConfigError(f"{path} is a grant for run {grant.run_id!r}, not {run_id!r}")
    if grant.public != key.public:
        raise ConfigError(f"{path} grants another key, not this workdir's node.key (id {key.key_id})")
    if not verify(authority.public, grant.signature, grant_message(run_id, grant.public, grant.name)):
        raise ConfigError(f"{path} is not signed by this run's authority (id {authority.key_id})")
