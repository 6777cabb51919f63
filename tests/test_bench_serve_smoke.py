"""Smoke test of scripts/bench_serve.py: a --quick run against the session's serving artifact
writes its JSON and table, with no failed request (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures_artifacts import aot_cache_env, subprocess_env  # noqa: F401
from fixtures_serve import CHUNK, SLOTS, serve_art  # noqa: F401

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"


def test_bench_serve_quick(serve_art, tmp_path):
    out = tmp_path / "bench-serve"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--artifact", str(serve_art.path), "--weights", str(serve_art.weights),
         "--slots", str(SLOTS), "--prefill-chunk", str(CHUNK), "--out", str(out)],
        env=subprocess_env(serve_art.cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "bench-serve.json").read_text())
    assert [s["clients"] for s in res["scenarios"]] == [1, 4] and res["server_exit"] == 0
    assert res["versions"]["jax"] and res["server_args"][0] == "serve"
    for s in res["scenarios"]:
        for run in ("concurrent", "sequential"):
            summary = s[run]
            assert summary["failed"] == 0, summary["errors"]
            assert summary["requests"] == 2 * s["clients"] and summary["tokens"] == 16 * summary["requests"]
            assert summary["tok_s"] > 0 and summary["ttft_p50_s"] > 0 and summary["tpot_p99_s"] > 0
    it = res["interleave"]
    assert it["long_error"] is None and it["long_ttft_s"] > 0 and it["runner_gap_median_s"] > 0
    assert "clients | requests | tok/s" in (out / "bench-serve-table.txt").read_text()
    assert "clients | requests | tok/s" in proc.stdout
