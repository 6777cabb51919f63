"""atomic_directory / atomic_write_bytes: all-or-nothing writes, kills, and concurrent writers."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.tools.atomic import atomic_directory, atomic_write_bytes, clean_stale
from runtime.errors import ExportError

REPO = Path(__file__).resolve().parents[1]


def _write_set(d: Path, tag: str, n: int = 3) -> None:
    for i in range(n):
        (d / f"{tag}{i}").write_text(f"{tag}-{i}")


def _contents(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.") and not p.endswith(".lock")]


def _old_artifact(tmp_path: Path) -> Path:
    dest = tmp_path / "art"
    with atomic_directory(dest) as d:
        _write_set(d, "old")
    return dest


def test_success(tmp_path):
    dest = tmp_path / "out" / "art"  # missing parents are created
    with atomic_directory(dest) as d:
        assert d.parent == dest.parent and d.name.startswith(".art.tmp-")
        assert not dest.exists()
        _write_set(d, "a")
    assert _contents(dest) == {"a0": "a-0", "a1": "a-1", "a2": "a-2"}
    assert _leftovers(dest.parent, "art") == []


def test_exception_leaves_nothing(tmp_path):
    dest = tmp_path / "art"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(dest) as d:
            _write_set(d, "a")
            raise RuntimeError("boom")
    assert not dest.exists() and _leftovers(tmp_path, "art") == []


def test_exception_keeps_old(tmp_path):
    dest = _old_artifact(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dest, force=True) as d:
            _write_set(d, "new")
            raise KeyboardInterrupt
    assert _contents(dest) == {"old0": "old-0", "old1": "old-1", "old2": "old-2"}
    assert _leftovers(tmp_path, "art") == []


def test_existing_without_force(tmp_path):
    dest = _old_artifact(tmp_path)
    with pytest.raises(ExportError, match=r"art already exists: pass --force to replace it"):
        with atomic_directory(dest):
            pytest.fail("must not be entered")
    assert _contents(dest)["old0"] == "old-0"


def test_appeared_meanwhile_without_force(tmp_path):
    dest = tmp_path / "art"
    with pytest.raises(ExportError, match="already exists"):
        with atomic_directory(dest) as d:
            _write_set(d, "mine")
            dest.mkdir()
            (dest / "theirs").write_text("t")
    assert _contents(dest) == {"theirs": "t"}
    assert _leftovers(tmp_path, "art") == []


def test_force_replaces_whole(tmp_path):
    dest = _old_artifact(tmp_path)
    with atomic_directory(dest, force=True) as d:
        (d / "new").write_text("n")
    assert _contents(dest) == {"new": "n"}
    assert _leftovers(tmp_path, "art") == []


def test_force_without_renameat2(tmp_path, monkeypatch):
    import runtime.tools.atomic

    monkeypatch.setattr(runtime.tools.atomic, "_exchange", lambda a, b: False)
    dest = _old_artifact(tmp_path)
    with atomic_directory(dest, force=True) as d:
        (d / "new").write_text("n")
    assert _contents(dest) == {"new": "n"}
    assert _leftovers(tmp_path, "art") == []


def test_force_replaces_a_file(tmp_path):
    dest = tmp_path / "art"
    dest.write_text("a plain file")
    with atomic_directory(dest, force=True) as d:
        (d / "new").write_text("n")
    assert _contents(dest) == {"new": "n"}


def test_unwritable_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"cannot write to .*file"):
        with atomic_directory(tmp_path / "file" / "sub" / "art"):
            pytest.fail("must not be entered")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a 0o500 directory")
def test_readonly_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(ExportError, match=f"permission denied: {ro}"):
            with atomic_directory(ro / "art"):
                pytest.fail("must not be entered")
    finally:
        ro.chmod(0o700)


def test_stale_temp_dirs_cleaned(tmp_path):
    stale = tmp_path / ".art.tmp-dead"
    stale.mkdir()
    (stale / "partial").write_text("p")
    busy = tmp_path / ".art.tmp-busy"
    busy.mkdir()
    fresh = tmp_path / ".art.tmp-fresh"
    fresh.mkdir()
    two_hours_ago = time.time() - 7200
    for p in (stale, busy):
        os.utime(p, (two_hours_ago, two_hours_ago))
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer's lock
    try:
        with atomic_directory(tmp_path / "art") as d:
            (d / "x").write_text("x")
    finally:
        os.close(fd)
    assert not stale.exists() and busy.exists() and fresh.exists()
    clean_stale(tmp_path, "art", max_age=0)
    assert _leftovers(tmp_path, "art") == []


def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.json"]
    with pytest.raises(ExportError, match="cannot write to"):
        atomic_write_bytes(tmp_path / "missing" / "f", b"x")
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.json"]


# ---------------------------------------------------------------- other processes

_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from runtime.tools.atomic import atomic_directory
    from runtime.errors import ExportError
    dest, tag, force, go, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], float(sys.argv[5])
    while go and not os.path.exists(go):
        time.sleep(0.001)
    try:
        with atomic_directory(dest, force=force) as d:
            for i in range(20):
                (Path(d) / f"{tag}{i:02d}").write_text(tag * 1000)
                if i == 10:
                    print("READY", flush=True)
                    time.sleep(hold)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
""")


def _spawn(dest: Path, tag: str, force: bool, go: str = "", hold: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(dest), tag, "1" if force else "0", go, str(hold)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _is_one_complete_set(dest: Path, tags: tuple[str, ...]) -> str:
    names = sorted(os.listdir(dest))
    tag = names[0][0]
    assert tag in tags
    assert names == [f"{tag}{i:02d}" for i in range(20)], names
    assert all((dest / n).read_text() == tag * 1000 for n in names)
    return tag


def test_sigkill_mid_write_keeps_old(tmp_path):
    dest = _old_artifact(tmp_path)
    proc = _spawn(dest, "k", force=True, hold=60)
    try:
        assert proc.stdout.readline().strip() == "READY"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert _contents(dest) == {"old0": "old-0", "old1": "old-1", "old2": "old-2"}
    assert len(_leftovers(tmp_path, "art")) == 1  # the killed writer's temp dir, never `dest`
    clean_stale(tmp_path, "art", max_age=0)  # its lock died with it
    assert _leftovers(tmp_path, "art") == []


def test_sigkill_first_write_leaves_no_dest(tmp_path):
    dest = tmp_path / "art"
    proc = _spawn(dest, "k", force=False, hold=60)
    try:
        assert proc.stdout.readline().strip() == "READY"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert not os.path.lexists(dest)


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_writers(tmp_path, force):
    dest = tmp_path / "art"
    go = tmp_path / "go"
    procs = [_spawn(dest, tag, force, str(go)) for tag in ("x", "y")]
    time.sleep(0.3)  # let both interpreters start and wait at the barrier
    go.write_text("")
    results = [(p.wait(30), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    if force:
        assert codes == [0, 0], results
    else:
        assert codes == [0, 3], results
        err = next(e for rc, e in results if rc == 3)
        assert "already exists: pass --force" in err and "Traceback" not in err
    _is_one_complete_set(dest, ("x", "y"))
    assert _leftovers(tmp_path, "art") == []
