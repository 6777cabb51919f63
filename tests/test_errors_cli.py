"""Bad artifacts, versions, weights, requests and exports through the `mamba2-aot` CLI.

For every case the CLI exits non-zero (2) and prints exactly one `error: ...` line that names the
problem and the fix, and no traceback. The cases are the tables of test_errors_api.py; most run
`runtime.tools.cli.main` in-process (fd-level capture, so native output would show up too), and a few
run the installed console script in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime
import runtime.tools.cli
from test_errors_api import (  # noqa: F401  (fixtures are used by name)
    ARTIFACT_CASES,
    TINY_CFG,
    WEIGHT_CASES,
    bad_weights,
    broken_artifact,
    exported_artifact,
    isolated_compile_cache,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = ("--prompt-ids", "1,2,3", "--max-new-tokens", "4")  # within the tiny cap of 16


def cli(capfd, *args) -> tuple[int, str, str]:
    """Run `mamba2-aot ARGS` in-process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        runtime.tools.cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return e.value.code, out, err


def error_line(code, err: str, *needles: str, exit_code: int = 2) -> str:
    """The single `error:` line of a clean failure (notes may precede it), checked for needles."""
    assert code == exit_code, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert all(ln.startswith(("error:", "note:")) for ln in lines), err  # no native noise either
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ---------------------------------------------------------------- artifacts and versions


@pytest.mark.parametrize("name", list(ARTIFACT_CASES))
def test_artifact_cases(name, capfd, tmp_path, tmp_path_factory):
    art = broken_artifact(name, tmp_path, tmp_path_factory)
    code, out, err = cli(capfd, "generate", art, "--weights", "random", *PROMPT)
    error_line(code, err, *ARTIFACT_CASES[name].needles)
    assert out == ""


def test_an_expired_artifact_still_runs_with_one_warning_line(capfd, tmp_path, tmp_path_factory):
    art = tmp_path / "art"
    shutil.copytree(exported_artifact(tmp_path_factory), art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["compatibility"]["expires"] = "2020-01-01"  # still inside the jax version window
    (art / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli(capfd, "generate", art, "--weights", "random", *PROMPT, "--json")
    assert code == 0 and len(json.loads(out)["tokens"][0]) == 4
    assert err.splitlines() == ["warning: artifact passed its compatibility date 2020-01-01: jax may stop loading "
                                "it; re-export it with the current mamba2-aot",
                                "warning: using seeded random weights (seed 0), as asked: the outputs are "
                                "meaningless"], err
    with pytest.warns(RuntimeWarning, match="passed its compatibility date 2020-01-01"):
        model = runtime.load(art, "random")
    assert model.warnings and "2020-01-01" in model.warnings[0]


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("name", list(WEIGHT_CASES))
def test_weight_cases(name, capfd, bad_weights, tmp_path_factory):
    code, out, err = cli(capfd, "generate", exported_artifact(tmp_path_factory), "--weights", bad_weights[name],
                         *PROMPT)
    error_line(code, err, *WEIGHT_CASES[name][1])
    assert out == ""


# ---------------------------------------------------------------- requests

V, P, N = TINY_CFG.vocab_size, 32, 16  # the artifact's vocabulary, prompt limit, new-token cap
REQUEST_CASES = [
    ("empty-prompt", ["--prompt-ids", ""], "prompt 0 is empty"),
    ("only-commas", ["--prompt-ids", ",,"], "prompt 0 is empty"),
    ("malformed-ids", ["--prompt-ids", "1,x"], "--prompt-ids '1,x' is not a comma-separated list of integers"),
    ("float-ids", ["--prompt-ids", "1,2.5"], "is not a comma-separated list of integers"),
    ("negative-id", ["--prompt-ids=-1,2"], "token id -1 outside the vocabulary [0, 96)"),
    ("id-at-vocab", ["--prompt-ids", "1", "--prompt-ids", f"3,{V}"], f"prompt 1 has token id {V} outside"),
    ("prompt-over-limit", ["--prompt-ids", ",".join(["7"] * (P + 1))], f"over the artifact's limit of {P}"),
    ("batch-over-limit", ["--prompt-ids", "1"] * 5, "batch of 5 prompts is over the artifact's limit of 4"),
    ("max-new-tokens-0", [*PROMPT, "--max-new-tokens", "0"], f"max_new_tokens must be in [1, {N}]"),
    ("max-new-tokens-negative", [*PROMPT, "--max-new-tokens", "-5"], f"max_new_tokens must be in [1, {N}]"),
    ("max-new-tokens-over-cap", [*PROMPT, "--max-new-tokens", str(N + 1)], f"must be in [1, {N}] (the artifact's cap)"),
    ("temperature-negative", [*PROMPT, "--temperature", "-1"], "temperature must be >= 0"),
    ("temperature-nan", [*PROMPT, "--temperature", "nan"], "temperature must be >= 0"),
    ("top-p-0", [*PROMPT, "--top-p", "0"], "top_p must be in (0, 1]"),
    ("top-p-over-1", [*PROMPT, "--top-p", "1.01"], "top_p must be in (0, 1]"),
    ("top-k-negative", [*PROMPT, "--top-k", "-1"], "top_k must be an integer >= 0"),
    ("min-p-1", [*PROMPT, "--min-p", "1"], "min_p must be in [0, 1)"),
    ("min-p-negative", [*PROMPT, "--min-p", "-0.5"], "min_p must be in [0, 1)"),
    ("stop-outside-vocab", [*PROMPT, "--stop-id", str(V)], f"stop token {V} is outside the vocabulary"),
    ("too-many-stops", [*PROMPT, *sum((["--stop-id", str(i)] for i in range(5)), [])],
     "5 stop tokens, over the artifact's limit of 4"),
    ("seed-negative", [*PROMPT, "--seed", "-1"], "seed must be an integer >= 0"),
    ("block-0", [*PROMPT, "--stream", "--block", "0"], "block must be a positive integer"),
    ("no-prompts", [], "give prompts with either --prompt or --prompt-ids"),
    ("both-prompt-kinds", ["--prompt", "hi", *PROMPT], "give prompts with either --prompt or --prompt-ids"),
    ("text-without-tokenizer", ["--prompt", "hello"], "needs the checkpoint's tokenizer.json"),
]


@pytest.mark.parametrize("name, args, needle", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_request_cases(name, args, needle, capfd, tmp_path_factory):
    code, out, err = cli(capfd, "generate", exported_artifact(tmp_path_factory), *args)
    error_line(code, err, needle)
    assert out == ""


@pytest.mark.parametrize("args", [["--max-new-tokens", "lots"], ["--temperature", "warm"], ["--top-k", "1.5"]])
def test_unparsable_option_is_a_usage_error(args, capfd, tmp_path_factory):
    """click's usage errors: exit 2, 'Error: Invalid value ...', no traceback."""
    code, out, err = cli(capfd, "generate", exported_artifact(tmp_path_factory), *PROMPT, *args)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"Invalid value for '{args[0]}'" in err


# ---------------------------------------------------------------- export


def test_export_unknown_model_suggests_names(capfd, tmp_path):
    code, out, err = cli(capfd, "export", "--model", "mamba2-tiny", "--out", tmp_path / "a")
    error_line(code, err, "unknown model 'mamba2-tiny'", "use one of 130m, 370m, 780m, 1.3b, 2.7b")
    assert not (tmp_path / "a").exists()


def test_export_bad_config_file(capfd, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = cli(capfd, "export", "--model", tmp_path / "config.json", "--out", tmp_path / "a")
    error_line(code, err, "cannot read", "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = cli(capfd, "export", "--model", tmp_path, "--out", tmp_path / "a")
    error_line(code, err, "model_type 'llama'", "expected 'mamba2'")


def test_export_out_under_a_regular_file(capfd, tmp_path):
    (tmp_path / "file").write_text("I am a file")
    code, _, err = cli(capfd, "export", "--model", "130m", "--out", tmp_path / "file" / "sub" / "art")
    error_line(code, err, "cannot write to", "is a file, not a directory", "choose another destination")
    assert (tmp_path / "file").read_text() == "I am a file"


def test_export_existing_destination_needs_force(capfd, tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "keep").write_text("earlier")
    code, _, err = cli(capfd, "export", "--model", "130m", "--out", tmp_path / "art")
    error_line(code, err, "already exists", "pass --force to replace it")
    assert os.listdir(tmp_path / "art") == ["keep"]


# ---------------------------------------------------------------- the real console script


def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "mamba2-aot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runtime.tools.cli"]


def test_console_script_failures_are_one_line(tmp_path, tmp_path_factory, bad_weights):
    """The installed `mamba2-aot` (subprocesses, run concurrently): exit 2, one error line."""
    good = exported_artifact(tmp_path_factory)
    runs = {
        "missing artifact": (["generate", tmp_path / "nope", *PROMPT], "no artifact directory"),
        "nan weights": (["generate", good, "--weights", bad_weights["nan"], *PROMPT], "non-finite"),
        "unknown model": (["export", "--model", "nope", "--out", tmp_path / "x"], "use one of 130m"),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "MAMBA2_AOT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MAMBA2_AOT_DEBUG", None)
    procs = {name: subprocess.Popen([*_entry_point(), *map(str, args)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for name, (args, _) in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        error_line(proc.returncode, err, runs[name][1])
        assert "Traceback" not in out, (name, out)
