"""The README's walk-through works against the demo data, as a newcomer would run it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_walkthrough_runs_against_the_demo_seed(server_factory) -> None:
    server = server_factory(CANARY_SEED=str(ROOT / "demo" / "seed.json"))
    result = subprocess.run([sys.executable, "demo/walkthrough.py", server.http], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    kinds = [line.split('"type": "')[1].split('"')[0] for line in result.stdout.splitlines() if "<-" in line]
    assert kinds == ["session_created", "session_joined", "member_joined", "session_joined", "member_joined",
                     "member_joined", "labels_snapshot", "bounding_boxes_snapshot", "labels_snapshot",
                     "member_left", "member_left", "session_closed"]
    assert result.stdout.rstrip().endswith("bob: closed with code 4000")
