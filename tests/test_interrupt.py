"""Interrupted and concurrent `mamba2-aot export` runs never leave a partial or mixed artifact.

Real `mamba2-aot export` subprocesses: one SIGKILLed mid-export (as soon as its temp dir
appears), and two racing to the same --out with and without --force. (test_atomic.py covers
runtime.tools.atomic itself with toy writers; these go through the exporter end to end.)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jaxlib
import pytest

import runtime
from runtime.tools.atomic import clean_stale
from runtime.format.integrity import verify_files
from runtime.format.manifest import MANIFEST_NAME, read_manifest
from test_errors_api import TINY_CFG, exported_artifact, isolated_compile_cache  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MAMBA2_AOT_CACHE_DIR": str(tmp_path / "xla-cache")}
    env.pop("MAMBA2_AOT_DEBUG", None)
    return env


def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "mamba2-aot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runtime.tools.cli"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _temp_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


# ---------------------------------------------------------------- SIGKILL mid-export


@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-earlier-artifact", "fresh-destination"])
def test_sigkill_mid_export(earlier, tmp_path, tmp_path_factory):
    work = tmp_path / "out"
    work.mkdir()
    dest = work / "art"
    if earlier:
        shutil.copytree(exported_artifact(tmp_path_factory), dest)
        before = _tree(dest)
    log = open(tmp_path / "export.log", "w")
    proc = subprocess.Popen([*_entry_point(), "export", "--model", "370m", "--out", str(dest), "--force"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not _temp_dirs(work, "art"):  # the export has begun writing beside `dest`
            assert proc.poll() is None, (tmp_path / "export.log").read_text()
            assert time.monotonic() < deadline, "the export never created its temp dir"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "export.log").read_text()

    if earlier:  # the earlier artifact is untouched and still verifies
        assert _tree(dest) == before
        manifest = read_manifest(dest)
        verify_files(dest, manifest)
        assert manifest.model["config"]["hidden_size"] == TINY_CFG.hidden_size  # not the 370m
        runtime.load(dest, "random")
    else:  # no partial artifact at the destination
        assert not os.path.lexists(dest)
    # Only the killed writer's hidden temp dir (and the lock file) remain beside it...
    leftovers = sorted(p.name for p in work.iterdir() if p.name != "art")
    assert len(_temp_dirs(work, "art")) == 1 and set(leftovers) <= {".art.lock", _temp_dirs(work, "art")[0].name}
    clean_stale(work, "art", max_age=0)  # ...which the next export cleans up once it is stale
    assert _temp_dirs(work, "art") == []


# ---------------------------------------------------------------- two exports at once

# Imports everything first, waits at a barrier file, then runs `mamba2-aot export ARGS`.
_RACER = textwrap.dedent("""
    import os, sys, time
    import exporter.cli, runtime.tools.cli
    go = sys.argv[1]
    while not os.path.exists(go):
        time.sleep(0.001)
    runtime.tools.cli.main(sys.argv[2:])
""")


@pytest.mark.parametrize("forces", [(False, False), (True, True), (True, False)],
                         ids=["neither-forces", "both-force", "one-forces"])
def test_two_exports_to_one_destination(forces, tmp_path):
    hf = {"model_type": "mamba2", **TINY_CFG.to_dict()}
    hf.pop("name")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(hf))
    dest = tmp_path / "art"
    go = tmp_path / "go"
    # Different decode-loop capacities: the two exports' decode modules differ byte for byte.
    caps = (16, 8)
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    procs = []
    for cap, force in zip(caps, forces):
        args = ["export", "--model", str(tmp_path / "tiny"), "--out", str(dest), "--max-batch", "2",
                "--max-prompt-tokens", "16", "--max-new-tokens", str(cap), *(["--force"] if force else [])]
        procs.append(subprocess.Popen([sys.executable, "-c", _RACER, str(go), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path))
    time.sleep(0.5)
    go.write_text("")
    results = [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=180)]]
    finished = dt.datetime.now(dt.timezone.utc)

    for (code, out, err), force in zip(results, forces):
        assert "Traceback" not in err, err
        if code != 0:  # the loser of a race without --force fails cleanly
            assert not force and code == 2, (code, err)
            errors = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "already exists: pass --force to replace it" in errors[0], err
    codes = [code for code, _, _ in results]
    if forces == (False, False):
        assert sorted(codes) == [0, 2], results
    elif forces == (True, True):
        assert codes == [0, 0], results
    else:
        assert codes[0] == 0 and codes[1] in (0, 2), results
    winners = [cap for cap, code in zip(caps, codes) if code == 0]

    # The destination is one whole artifact: every file matches the manifest, nothing else is there.
    manifest = read_manifest(dest)
    verify_files(dest, manifest)
    assert set(_tree(dest)) == set(manifest.files) | {MANIFEST_NAME}
    assert manifest.limits.max_new_tokens in winners
    decode_out = next(t for t in manifest.functions["decode"].outputs if t.name == "tokens")
    assert decode_out.shape[-1] == manifest.limits.max_new_tokens  # signature agrees with the limits
    created = dt.datetime.fromisoformat(manifest.created)
    assert started <= created <= finished
    assert manifest.producer.package == "mamba2-aot" and manifest.producer.version == runtime.__version__
    assert (manifest.producer.jax, manifest.producer.jaxlib) == (jax.__version__, jaxlib.__version__)
    assert _temp_dirs(tmp_path, "art") == []
