"""Names bound to the first key that joined under them (coordinator/names.py): the table's bound, a state dir from
before bindings, and the operator's ``--forget-name``. The squatting attack itself: tests/security/
test_adv_eviction.py. Harness: core_harness.py; fixtures ``clock``, ``make``: conftest.py."""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Callable

import pytest

from core_harness import Clock, Harness, run_text
from coordinator.errors import Conflict, Full
from coordinator.names import MAX_NAMES, Names
from coordinator.server import CoordinatorServer
from node.identity import NodeKey


def test_a_full_table_refuses_new_names_and_keeps_every_binding() -> None:
    key = NodeKey.generate().public
    names = Names((f"n{i}", key, 0.0, 0.0, "") for i in range(MAX_NAMES))
    with pytest.raises(Full, match=f"bound {MAX_NAMES} names to keys, its limit.*--forget-name") as info:
        names.check("newcomer", key)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    names.check("n7", key)  # a name this key holds still joins
    with pytest.raises(Conflict):
        names.check("n7", NodeKey.generate().public)


def test_a_state_dir_from_before_bindings_binds_its_members_names_at_start(make: Callable[..., Harness],
                                                                           tmp_path: Path) -> None:
    h = make()
    h.join("a")
    h.close()
    with sqlite3.connect(tmp_path / "state" / "coordinator.sqlite") as db:
        db.execute("DELETE FROM names")  # as a coordinator before this table left it
    db.close()
    h = make()
    with pytest.raises(Conflict, match="the name 'a' is bound to key"):
        h.join("a", key=NodeKey.generate())
    h.close()
    h = make()  # and the binding made at start was written
    with pytest.raises(Conflict, match="the name 'a' is bound to key"):
        h.join("a", key=NodeKey.generate())


def test_forget_name_frees_a_name_for_another_key(make: Callable[..., Harness], tmp_path: Path, clock: Clock,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    h = make()
    h.join("a")
    h.core.leave(h.ids["a"], "its key file is lost")
    h.close()
    run_file = tmp_path / "run.toml"
    run_file.write_text(run_text())
    with caplog.at_level(logging.WARNING, logger="coordinator.server"):
        server = CoordinatorServer("127.0.0.1:0", tmp_path / "state", run_file, forget_names=["a", "nobody"])
    server.stop(grace=0)
    assert "name 'a' freed" in caplog.text and "nobody" not in caplog.text
    h = make()
    h.join("a", key=NodeKey.generate())  # a new key holds it now
