"""The `mamba2-aot` CLI skeleton: lazy commands, plugin discovery, one-line errors, `inspect`."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

import runtime.tools.cli
from runtime import __version__
from runtime.errors import WeightsError
from test_manifest import FAKE_FILES, fake_manifest, make_artifact

REPO = Path(__file__).resolve().parents[1]

# Runs runtime.tools.cli.main with heavy / exporter packages made unimportable, then reports which of
# them got loaded anyway.
_BLOCKED_RUN = textwrap.dedent("""
    import sys
    BLOCK = {"exporter", "flax", "tensorflow", "torch"}
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCK:
                raise ImportError(f"blocked import of {name}")
    sys.meta_path.insert(0, Blocker())
    from runtime.tools.cli import main
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    loaded = sorted({m.split(".")[0] for m in sys.modules} & (BLOCK | {"jax"}))
    print("LOADED=" + ",".join(loaded), file=sys.stderr)
    sys.exit(code)
""")


def run_blocked(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("MAMBA2_AOT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", _BLOCKED_RUN, *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def _loaded(stderr: str) -> list[str]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("LOADED=")][-1]
    return [m for m in line[len("LOADED="):].split(",") if m]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if not ln.startswith("LOADED=")]


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        runtime.tools.cli.main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ---------------------------------------------------------------- help, version, plugins


def test_help_lists_commands_without_importing_them():
    r = run_blocked("--help")
    assert r.returncode == 0, r.stderr
    for name in ("export", "verify", "inspect"):
        assert f"  {name} " in r.stdout
    assert _loaded(r.stderr) == []  # neither exporter nor jax was imported


def test_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.startswith(f"mamba2-aot {__version__}")


def test_unavailable_plugin_is_one_line_error():
    r = run_blocked("export", "--help")
    assert r.returncode == 2
    errors = _errors(r.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: command 'export' is unavailable")
    assert "Traceback" not in r.stderr


def test_unknown_command_is_usage_error(capsys):
    code, _, err = run_main(capsys, "no-such-command")
    assert code == 2 and "No such command" in err


def test_plugin_loaded_only_when_invoked(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_plugin_mod.py").write_text(textwrap.dedent("""
        import click
        @click.command()
        def hello():
            "Say hello."
            click.echo("hello from plugin")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(runtime.tools.cli, "_plugins", lambda: {"hello": "fake_plugin_mod:hello"})
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "hello" in out and "fake_plugin_mod" not in sys.modules
    code, out, _ = run_main(capsys, "hello")
    assert code == 0 and out == "hello from plugin\n"


def test_builtin_table_is_one_line_per_command(monkeypatch, capsys):
    monkeypatch.setitem(runtime.tools.cli.BUILTIN_COMMANDS, "echo-version", ("runtime.tools.cli:cli", "Nested group."))
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and re.search(r"echo-version +Nested group\.", out)


# ---------------------------------------------------------------- error reporting


def test_mamba2aot_error_exit_2(monkeypatch, capsys):
    def boom(_artifact):
        raise WeightsError("weights file w.safetensors is missing: pass --weights")

    monkeypatch.setattr("runtime.tools.inspect_cmd.describe", boom)
    code, out, err = run_main(capsys, "inspect", "x")
    assert code == 2 and out == ""
    assert err == "error: weights file w.safetensors is missing: pass --weights\n"


def test_internal_error_exit_1(monkeypatch, capsys):
    def boom(_artifact):
        raise ValueError("something\nunexpected")

    monkeypatch.setattr("runtime.tools.inspect_cmd.describe", boom)
    monkeypatch.delenv("MAMBA2_AOT_DEBUG", raising=False)
    code, _, err = run_main(capsys, "inspect", "x")
    assert code == 1
    assert err == ("error: internal error: ValueError: something unexpected "
                   "(set MAMBA2_AOT_DEBUG=1 for a traceback)\n")
    monkeypatch.setenv("MAMBA2_AOT_DEBUG", "1")
    with pytest.raises(ValueError):
        runtime.tools.cli.main(["inspect", "x"])


# ---------------------------------------------------------------- inspect


def test_inspect_text(tmp_path):
    art = make_artifact(tmp_path)
    r = run_blocked("inspect", str(art))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("tiny", "hidden_size", "float32", "cpu", "mamba2-aot 0.1.0 (jax 0.10.2, jaxlib 0.10.2)",
                   "2025-06-01T12:00:00+00:00", "jax [0.10.0, 0.11.0)", "max_batch 4", "prompt [16, 64]",
                   "(tokens: int32[b, 64], lengths: int32[b], state/ssm: float32[2, b, 4, 8])",
                   "-> (logits: float32[b, 128])", "version 2: prefill continues from a state",
                   "256 B per sequence whatever its length", "no request allocates more than",
                   "prefill.cpu.jaxexport", "total"):
        assert needle in out, needle
    assert f"{sum(map(len, FAKE_FILES.values())) / 1024:.1f} KiB in 2 files" in out
    assert _loaded(r.stderr) == []  # reading a manifest needs no jax


def test_inspect_json(tmp_path, capsys):
    art = make_artifact(tmp_path)
    code, out, _ = run_main(capsys, "inspect", str(art), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["model_name"] == "tiny" and info["model"] == fake_manifest()["model"]
    assert info["platforms"] == ["cpu"] and info["dtype"] == "float32"
    assert info["compatibility"]["current_jax_supported"] is True
    assert info["limits"]["vocab_size"] == 128
    assert set(info["functions"]) == {"prefill", "decode"}
    assert info["functions"]["decode"]["signature"] == "decode(token: int32[b]) -> (tokens: int32[b, 32])"
    assert info["total_bytes"] == sum(map(len, FAKE_FILES.values()))
    assert info["files"]["decode.cpu.jaxexport"]["bytes"] == len(FAKE_FILES["decode.cpu.jaxexport"])


def test_inspect_outside_jax_window(tmp_path, capsys):
    m = fake_manifest()
    m["compatibility"].update(jax_min="0.4.0", jax_max_exclusive="0.5.0", expires="2020-01-01")
    art = make_artifact(tmp_path, manifest=m)
    code, out, _ = run_main(capsys, "inspect", str(art))
    assert code == 0 and "NOT supported" in out and "passed its compatibility date" in out


def test_inspect_collapses_large_groups(tmp_path, capsys):
    m = fake_manifest()
    params = [{"name": f"params/w{i}", "shape": [4, 4], "dtype": "float32"} for i in range(30)]
    m["functions"]["prefill"]["inputs"][:0] = params
    art = make_artifact(tmp_path, manifest=m)
    code, out, _ = run_main(capsys, "inspect", str(art))
    assert code == 0 and "(params: 30 float32 tensors, tokens: int32[b, 64]" in out and "params/w1" not in out


def test_inspect_missing_dir():
    r = run_blocked("inspect", "/nonexistent/artifact")
    assert r.returncode == 2
    assert _errors(r.stderr) == ["error: no artifact directory at /nonexistent/artifact"]
    assert r.stdout == ""


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "mamba2-aot-artifact", "schema_version": 7}'])
def test_inspect_bad_manifest(tmp_path, capsys, content):
    (tmp_path / "manifest.json").write_bytes(content)
    code, out, err = run_main(capsys, "inspect", str(tmp_path))
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_inspect_missing_argument(capsys):
    code, _, err = run_main(capsys, "inspect")
    assert code == 2 and "Missing argument" in err


def test_click_is_the_only_ui_dependency():
    assert isinstance(runtime.tools.cli.cli, click.Group)
