"""Smoke tests of the benchmarks: a --quick run writes its JSON, table and plot (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"

pytest.importorskip("matplotlib")


def test_bench_quick(tmp_path):
    out = tmp_path / "bench-out"
    env = {**os.environ, "MAMBA2_AOT_CACHE_DIR": str(tmp_path / "xla-cache")}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--layers", "2", "--skip-hf", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (out / "bench-position.png").stat().st_size > 0
    assert (out / "bench-table.txt").is_file()
    assert not (out / "work").exists(), "work directory (weights, artifacts) left behind"
    res = json.loads((out / "bench.json").read_text())
    for key in ("started", "finished", "machine", "versions", "settings", "model", "roofline",
                "systems", "start", "big", "token_agreement", "table", "notes"):
        assert key in res, key
    assert set(res["systems"]) == {"runtime", "live", "hostloop"}
    for name, system in res["systems"].items():
        assert "error" not in system, (name, system["error"])
        assert system["peak_rss_mib"] > 0
        assert set(system["decode"]) == {"B1_n16", "B8_n16"}
        assert system["decode"]["B1_n16"]["tok_s"] > 0
        assert system["position"]["positions"][-1] == 256
        if name != "hostloop":
            assert system["prefill"]["128"]["tok_s"] > 0
    assert set(res["systems"]["runtime"]["decode_sampled"]) == {"temperature", "top_k", "top_p"}
    for key in ("gb_s", "numpy_1thread_gb_s", "xla_matvec_gb_s"):
        assert res["roofline"]["bandwidth"][key] > 0
    assert res["roofline"]["gemm"]["gflop_s"] > 0
    assert res["start"]["cold"]["median_s"] > 0 and res["start"]["warm"]["median_s"] > 0
    assert res["big"]["systems"]["runtime"]["decode"]["B1_n16"]["tok_s"] > 0
    assert res["model"]["accounting"]["params_total"] == res["model"]["prep"]["count_params"]
    measures = {row["measure"] for row in res["table"]}
    assert "prefill T=128" in measures and "decode B=1 n=16" in measures
    assert any(row["status"] in ("met", "not met") for row in res["table"])
    assert "runtime" in (out / "bench-table.txt").read_text()


def test_bench_state_quick(tmp_path):
    out = tmp_path / "state"
    env = {**os.environ, "MAMBA2_AOT_CACHE_DIR": str(tmp_path / "xla-cache")}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_state.py"), "--quick", "--long", "700",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "state.json").read_text())
    turns = res["multi_turn"]["turns"]
    assert len(turns) == 3 and all(t["same_tokens"] for t in turns)
    assert res["multi_turn"]["cache"]["hits"] == 2  # turns 2 and 3 continue from the cache
    assert res["long_prompts"][0]["tokens"] == 700 and res["long_prompts"][0]["peak_rss_mib"] > 0
    assert "time to first token" in proc.stdout
