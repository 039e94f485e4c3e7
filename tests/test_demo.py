"""The README's walk-through works against the demo data, as a newcomer would run it."""

from __future__ import annotations

import json
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
                     "member_joined", "labels_snapshot", "bounding_boxes_snapshot", "member_image", "member_image",
                     "labels_snapshot", "labels_snapshot", "labels_snapshot",
                     "member_left", "member_left", "session_closed"]
    # bob's copy of image-1's keypoints, kept from each labels_snapshot's changes: the demo's, then the run's.
    snapshots = [json.loads(line.split("<- ", 1)[1])["changes"] for line in result.stdout.splitlines()
                 if line.lstrip().startswith("bob <-") and '"labels_snapshot"' in line]
    assert [c["reset"] for c in snapshots] == [True, False, False, False]
    assert [d["id"] for d in snapshots[0]["added"]] == ["kp-1"]
    (added,), (modified,), removed = snapshots[1]["added"], snapshots[2]["modified"], snapshots[3]["removed"]
    assert (added["data"]["position"], modified["data"]["position"]) == ({"x": 3, "y": 4}, {"x": 5, "y": 6})
    assert added["id"] == modified["id"]
    assert removed == [added["id"]]
    assert result.stdout.rstrip().endswith("bob: closed with code 4000")
