"""``lowband node`` starts its state download before it imports torch (node/transport/state_prefetch.py): on a
slow CPU that import takes seconds, which a joiner now spends downloading. Checked in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from node.cli import build_parser
args = build_parser().parse_args(["node", "--coordinator", "127.0.0.1:1", "--workdir", sys.argv[1]])
import node.transport.state_prefetch
assert args.func.__name__ == "cmd_node"
print(sorted(m for m in ("torch", "node.recipes", "hivemind") if m in sys.modules))
"""


def test_the_node_command_reaches_its_state_download_without_importing_torch(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
