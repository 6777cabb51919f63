"""Smoke test of scripts/bench_hybrid.py: a --quick run of one family (Granite-4.0-H's layout:
Mamba-2, attention and MoE) against HF writes its JSON and table (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_hybrid_quick(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_hybrid.py"), "--quick", "--families", "granitemoehybrid",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "work").exists(), "work directory (checkpoints) left behind"
    res = json.loads((out / "bench-hybrid.json").read_text())
    r = res["results"]["granitemoehybrid"]
    assert r["tokens_agree"], (r["runtime"]["tokens"], r["hf"]["tokens"])  # same weights, same greedy tokens
    for system in ("runtime", "hf"):
        assert set(r[system]["decode"]) == {"16", "64"}
        assert all(v["tok_s"] > 0 for v in r[system]["decode"].values())
        assert r[system]["prefill"]["64"]["tok_s"] > 0
    assert "granitemoehybrid" in (out / "bench-hybrid-table.txt").read_text()
