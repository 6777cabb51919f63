"""Faults the environment causes, tried as a user hits them: a full disk (a tiny tmpfs in a
private mount namespace, or the file-size limit), a read-only directory, the open-file limit, a
truncated compile cache. Each is one `error:` (or `warning:`) line naming the path and what to
do, exit status 2 for errors, and nothing left behind by a failed write.

The tmpfs cases need `unshare -rm` (a user + mount namespace: no root needed where the kernel
allows unprivileged user namespaces) and are skipped where it is unavailable; the limit cases
run everywhere.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import runtime.tools.cli
from fixtures_artifacts import REPO, subprocess_env
from runtime.environment import fmt_bytes

FIXTURE = REPO / "tests" / "fixtures" / "tiny-cpu-v1"
ARTIFACT, WEIGHTS = FIXTURE / "artifact", FIXTURE / "weights"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
GENERATE = ["generate", str(ARTIFACT), *sum((["--prompt-ids", ",".join(map(str, p))] for p in EXPECTED["prompts"]), []),
            "--max-new-tokens", str(EXPECTED["max_new_tokens"]), "--json"]
CLI = [sys.executable, "-m", "runtime.tools.cli"]
# In a fresh mount namespace: mount a tmpfs with $1's options on $2, run the rest, list $2.
_MOUNTED = ('opts=$1; mnt=$2; shift 2; mount -t tmpfs -o "$opts" tmpfs "$mnt" || exit 99; "$@"; rc=$?; '
            'echo "LISTING:$(ls -A "$mnt" | tr "\\n" " ")"; exit $rc')


@functools.cache
def _namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", _MOUNTED, "sh", "size=4k", "/tmp", "true"],
                           capture_output=True, text=True, timeout=30)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif("not _namespaces()", reason="no unshare -rm (user namespaces) to mount a tmpfs")


def _lines(stderr: str, kind: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(f"{kind}:")]


def _one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit 2 and exactly one `error:` line (no traceback, no library noise)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _in_tmpfs(options: str, mnt: Path, argv: list[str], env: dict) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run argv with a tmpfs (`options`) mounted at `mnt`: (result, what was left in `mnt`)."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["unshare", "-rm", "sh", "-c", _MOUNTED, "sh", options, str(mnt), *argv],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode != 99, r.stderr
    listing = [ln for ln in r.stdout.splitlines() if ln.startswith("LISTING:")][-1]
    r.stdout = r.stdout[: r.stdout.rindex("LISTING:")]
    return r, listing[len("LISTING:"):].split()


def _limited(limit: str, value: int, argv: list[str]) -> list[str]:
    """argv under the resource limit `limit` (set in a launcher that then execs argv: no
    preexec_fn, which would fork this multithreaded process)."""
    launch = "import os, resource, sys; resource.setrlimit(getattr(resource, sys.argv[1]), (int(sys.argv[2]),) * 2); " \
             "os.execv(sys.argv[3], sys.argv[3:])"
    return [sys.executable, "-c", launch, limit, str(value), *argv]


# ---------------------------------------------------------------- a full disk


@needs_tmpfs
def test_a_full_disk_during_export_names_the_file_and_leaves_nothing(tmp_path):
    mnt = tmp_path / "disk"
    r, left = _in_tmpfs("size=16k", mnt, [*CLI, "export", "--model", str(WEIGHTS), "--out", str(mnt / "art")],
                        subprocess_env(tmp_path / "cache"))
    line = _one_error(r, f"cannot write {mnt}/art/cpu/", ".jaxexport: no space left on the device; it needs ",
                      "free there: free some space or write elsewhere")
    assert "internal error" not in line
    assert left == []  # no partial artifact, no temp dir


@needs_tmpfs
def test_a_full_disk_during_convert_weights(tmp_path):
    mnt = tmp_path / "disk"
    r, left = _in_tmpfs("size=48k", mnt, [*CLI, "convert-weights", str(ARTIFACT), str(mnt / "ckpt"),
                                          "--weights", str(WEIGHTS)], subprocess_env(tmp_path / "cache"))
    from safetensors.numpy import load_file

    need = sum(a.nbytes for a in load_file(str(WEIGHTS / "model.safetensors")).values())
    _one_error(r, f"cannot write {mnt}/ckpt: not enough space on its device; it needs {fmt_bytes(need)}, ",
               "free there")
    assert left == []


_MANIFEST_ON_A_FULL_DISK = """if True:
    import json, sys
    from pathlib import Path
    from runtime.errors import ExportError
    from runtime.tools.writers import write_manifest
    mnt = Path(sys.argv[1])
    try:
        with open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass
    try:
        write_manifest(mnt, json.loads(Path(sys.argv[2]).read_text()))
    except ExportError as e:
        print("ERROR=" + str(e))
"""


@needs_tmpfs
def test_a_full_disk_writing_the_manifest(tmp_path):
    mnt = tmp_path / "disk"
    need = len((ARTIFACT / "manifest.json").read_bytes())
    r, left = _in_tmpfs("size=16k", mnt, [sys.executable, "-c", _MANIFEST_ON_A_FULL_DISK, str(mnt),
                                          str(ARTIFACT / "manifest.json")], subprocess_env())
    assert r.returncode == 0, r.stderr
    message = r.stdout.split("ERROR=", 1)[1].strip()
    assert message.startswith(f"cannot write {mnt}/manifest.json: no space left on the device; it needs "), message
    assert abs(float(message.split("it needs ")[1].split(" KiB")[0]) * 1024 - need) <= 100
    assert left == ["filler"]  # no temp file beside it


def test_the_file_size_limit_during_export(tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`): every write past it fails with EFBIG; no mount needed."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [*CLI, "export", "--model", str(WEIGHTS), "--out", str(out / "art")]
    r = subprocess.run(_limited("RLIMIT_FSIZE", 16384, argv), capture_output=True, text=True,
                       env=subprocess_env(tmp_path / "cache"), cwd=REPO, timeout=300)
    _one_error(r, f"cannot write {out}/art/cpu/", "over this process's file size limit of 16.0 KiB (`ulimit -f`); "
               "it needs ", "raise the limit")
    assert os.listdir(out) == []


# ---------------------------------------------------------------- read-only places


@needs_tmpfs
@pytest.mark.parametrize("options, warning", [
    ("ro", "cannot use the compile cache at {mnt} (Read-only file system): every start compiles again; set "
           "MAMBA2_AOT_CACHE_DIR to a writable directory"),
    # usable at load (an empty file fits), but its first entry does not
    ("size=4k", "cannot use the compile cache at {mnt} (No space left on device): continuing without it; every "
                "start compiles again until it is writable"),
], ids=["read-only", "full"])
def test_an_unusable_compile_cache_is_one_warning_and_generation_works(tmp_path, options, warning):
    mnt = tmp_path / "cache"
    r, _ = _in_tmpfs(options, mnt, [*CLI, *GENERATE, "--weights", str(WEIGHTS)], subprocess_env(mnt))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == EXPECTED["tokens"]
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == ["warning: " + warning.format(mnt=mnt)]


@needs_tmpfs
def test_a_read_only_export_destination(tmp_path):
    mnt = tmp_path / "ro"
    r, left = _in_tmpfs("ro", mnt, [*CLI, "export", "--model", str(WEIGHTS), "--out", str(mnt / "art")],
                        subprocess_env(tmp_path / "cache"))
    _one_error(r, f"cannot write {mnt}: read-only file system: use another path")
    assert left == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_weights(tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(WEIGHTS, weights)
    (weights / "model.safetensors").chmod(0)
    r = subprocess.run([*CLI, *GENERATE, "--weights", str(weights)], capture_output=True, text=True,
                       env=subprocess_env(tmp_path / "cache"), cwd=REPO, timeout=300)
    _one_error(r, f"permission denied: {weights}/model.safetensors")


# ---------------------------------------------------------------- the open-file limit


def test_too_many_open_files(tmp_path):
    """A checkpoint of 20 shards (one memory map each) under `ulimit -n 12`."""
    from safetensors.numpy import load_file, save_file

    shards = tmp_path / "sharded"
    shards.mkdir()
    weight_map = {}
    for i, (name, value) in enumerate(load_file(str(WEIGHTS / "model.safetensors")).items()):
        weight_map[name] = f"model-{i:05d}.safetensors"
        save_file({name: value}, str(shards / weight_map[name]))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert len(weight_map) >= 16
    env = subprocess_env(tmp_path / "cache")
    r = subprocess.run(_limited("RLIMIT_NOFILE", 12, [*CLI, *GENERATE, "--weights", str(shards)]),
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    _one_error(r, "too many open files opening ", "(this process may open 12): raise the limit (`ulimit -n`)")
    r = subprocess.run([*CLI, *GENERATE, "--weights", str(shards)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)  # the same checkpoint loads under the usual limit
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == EXPECTED["tokens"], r.stderr


def test_an_environment_oserror_anywhere_is_one_line_exit_2(monkeypatch, capsys):
    """The CLI's last resort: an OSError the environment causes is the user's to fix (exit 2)."""
    import runtime.tools.inspect_cmd as inspect_cmd

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")

    monkeypatch.setattr(inspect_cmd, "describe", full)
    with pytest.raises(SystemExit) as e:
        runtime.tools.cli.main(["inspect", str(ARTIFACT)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: cannot write /data/out.bin: no space left on the device")

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(inspect_cmd, "describe", bug)
    with pytest.raises(SystemExit) as e:
        runtime.tools.cli.main(["inspect", str(ARTIFACT)])
    assert e.value.code == 1 and "internal error: KeyError" in capsys.readouterr().err


# ---------------------------------------------------------------- a damaged compile cache


def test_a_truncated_compile_cache_is_one_warning_and_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    env = subprocess_env(cache)

    def run():
        r = subprocess.run([*CLI, *GENERATE, "--weights", str(WEIGHTS)], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["tokens"] == EXPECTED["tokens"]
        return [ln for ln in r.stderr.splitlines() if ln.strip()]

    assert run() == []
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) >= 2
    for entry in entries:  # as a killed writer or a full disk leaves them
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 3])
    (warning,) = run()
    assert warning == (f"warning: the compile cache at {cache} had {len(entries)} unreadable entries (truncated "
                       "or corrupt): removed, and rebuilt as programs compile")
    for entry in cache.glob("*-cache"):
        zlib.decompress(entry.read_bytes())  # whole again
    assert run() == []


# ---------------------------------------------------------------- wrapped libraries' tracebacks


def test_debug_shows_the_wrapped_librarys_own_traceback(tmp_path):
    """MAMBA2_AOT_DEBUG=1: the one-line error becomes a traceback that includes the library's own
    (the wrapper is raised `from` it); without it, one line."""
    from safetensors.numpy import load_file

    from runtime.tools.writers import save_orbax

    orbax_dir = save_orbax(load_file(str(WEIGHTS / "model.safetensors")), tmp_path / "orbax")
    for data in (orbax_dir / "ocdbt.process_0" / "d").iterdir():  # the arrays' bytes, not the metadata
        data.write_bytes(b"junk")
    art = tmp_path / "art"
    shutil.copytree(ARTIFACT, art)
    garbage = b"\x00not a flatbuffer" * 64
    (art / "cpu" / "prefill.jaxexport").write_bytes(garbage)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["cpu/prefill.jaxexport"] = {"sha256": hashlib.sha256(garbage).hexdigest(),
                                                   "bytes": len(garbage)}
    (art / "manifest.json").write_text(json.dumps(manifest))
    cases = {"orbax": ([*GENERATE, "--weights", str(orbax_dir)], "orbax/checkpoint"),
             "module": (["generate", str(art), "--prompt-ids", "1,2", "--weights", str(WEIGHTS)],
                        "jax/_src/export")}
    for name, (argv, library_frame) in cases.items():
        quiet = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                               env=subprocess_env(tmp_path / "cache"))
        _one_error(quiet)
        loud = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                              env=subprocess_env(tmp_path / "cache", MAMBA2_AOT_DEBUG="1"))
        assert loud.returncode != 0
        assert "The above exception was the direct cause of the following exception" in loud.stderr, name
        cause = loud.stderr.split("The above exception was the direct cause")[0]
        assert library_frame in cause, (name, cause[-2000:])


def test_an_orbax_checkpoint_without_orbax_names_the_extra(tmp_path):
    """orbax-checkpoint and tokenizers are extras: without them, safetensors checkpoints and
    --prompt-ids work, and what needs them says which extra to install."""
    from fixtures_artifacts import cli_wrapper

    orbax_dir = tmp_path / "orbax"
    orbax_dir.mkdir()
    (orbax_dir / "_CHECKPOINT_METADATA").write_text("{}")
    with_tokenizer = tmp_path / "tok"
    shutil.copytree(WEIGHTS, with_tokenizer)
    (with_tokenizer / "tokenizer.json").write_text("{}")
    env = subprocess_env(tmp_path / "cache")
    wrapper = cli_wrapper(("orbax", "tokenizers"))

    def run(*argv):
        return subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=300)

    r = run(*GENERATE, "--weights", str(WEIGHTS))
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == EXPECTED["tokens"], r.stderr
    assert "LEAKED=\n" in r.stderr + "\n"  # neither was imported
    for argv, needle in (
        ([*GENERATE, "--weights", str(orbax_dir)], "orbax checkpoints need the orbax package, which is not "
                                                    "installed (blocked import of orbax"),
        ([*GENERATE, "--weights", str(orbax_dir)], "): pip install 'mamba2-aot[orbax]'"),
        (["generate", str(ARTIFACT), "--prompt", "hi", "--weights", str(with_tokenizer)],
         "pip install 'mamba2-aot[tokenizers]'"),
    ):
        r = run(*argv)
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("LEAKED=")]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


def test_the_base_install_needs_neither_orbax_nor_tokenizers():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()  # noqa: E731
                          for r in reqs}
    assert not names(project["dependencies"]) & {"orbax-checkpoint", "tokenizers"}
    extras = project["optional-dependencies"]
    assert "orbax-checkpoint" in names(extras["orbax"]) and "tokenizers" in names(extras["tokenizers"])
    assert any(r.startswith("mamba2-aot[") and "orbax" in r and "tokenizers" in r for r in extras["test"])
