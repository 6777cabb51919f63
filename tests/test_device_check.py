"""scripts/device_check.py --quick: the device check's whole path (export, load, verify against the
float32 CPU model, speed, table, JSON) on a tiny model on this machine's backend, so the script a
lent GPU runs is never untested code. No timing checks."""

from __future__ import annotations

import json
import subprocess
import sys

from fixtures_artifacts import REPO, subprocess_env


def test_device_check_quick(tmp_path):
    out = tmp_path / "dc"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, env=subprocess_env(tmp_path / "cache"), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["device"]["platform"] == "cpu"
    assert [(row["model"], row["dtype"]) for row in report["results"]] == [("tiny", "float32"), ("tiny", "bfloat16")]
    for row in report["results"]:
        v = row["verify"]
        assert v["ok"], v
        assert set(v["relative_errors"]) == {"prefill logits", "prefill logits T=256", "final state"}
        assert len(v["agreement_lengths"]) == 8 and all(0 <= n <= v["steps"] for n in v["agreement_lengths"])
        assert set(row["speed"]["decode"]) == {"B1", "B8"} and row["speed"]["prefill"]["T256"]["tok_s"] > 0
    f32 = report["results"][0]["verify"]
    assert max(f32["relative_errors"].values()) <= 1e-3 and f32["token_failures"] == []
    assert report["probes"]["read_gb_s"] > 0 and set(report["peaks"]) == {"float32", "bfloat16"}
    assert "tiny   float32   PASS" in r.stdout and (out / "device_check.txt").is_file()
    assert not (out / "work").exists()
