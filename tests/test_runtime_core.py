"""The runtime's shape and contracts: what production imports (runtime.engine, runtime.format)
never needs the writers and tools (runtime.tools) nor fcntl; a module file is read once; the jax
pin and the artifacts' compatibility window agree; one loaded model serves several threads."""

from __future__ import annotations

import ast
import datetime as dt
import json
import re
import textwrap
import threading
import tomllib
from pathlib import Path

import pytest

from fixtures_artifacts import PROMPTS, REPO, aot_cache_env, run_python, subprocess_env, tiny  # noqa: F401
from runtime.format.compat import parse_version

FIXTURE = REPO / "tests" / "fixtures" / "tiny-cpu-v1"
ARTIFACT, WEIGHTS = FIXTURE / "artifact", FIXTURE / "weights"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
# The one import of runtime.tools from the engine: seeded random weights, when asked for.
ALLOWED = {("runtime/engine/model.py", "runtime.tools.random_init")}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_and_format_import_nothing_from_tools():
    found = set()
    for part in ("engine", "format"):
        for path in sorted((REPO / "runtime" / part).glob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            found |= {(rel, m) for m in _imports(path) if m == "runtime.tools" or m.startswith("runtime.tools.")}
    assert found == ALLOWED


# Imports that fail when asked for (a finer blocker than fixtures_artifacts': module prefixes).
_BLOCK = textwrap.dedent("""
    import sys
    BLOCKED = sys.argv[1].split(",")
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked import of {name}")
    sys.meta_path.insert(0, Blocker())
    sys.modules.pop("fcntl", None)
""")

_LOAD_AND_GENERATE = _BLOCK + textwrap.dedent("""
    import json
    import runtime.engine
    from runtime.engine.model import load
    model = load(sys.argv[2], sys.argv[3] if sys.argv[3] != "random" else "random")
    tokens = model.generate(json.loads(sys.argv[4]), 8, stop=[])
    print(json.dumps({"tokens": tokens, "modules": sorted(m for m in sys.modules if m.startswith("runtime."))}))
""")


def test_the_engine_runs_without_tools_or_fcntl(tmp_path):
    """A production process (load + generate) never imports runtime.tools, and needs no fcntl
    (the atomic writer's); asking for random weights brings only the random-init tool."""
    env = subprocess_env(tmp_path / "cache")
    r = run_python(_LOAD_AND_GENERATE, "runtime.tools,fcntl", ARTIFACT, WEIGHTS, json.dumps(EXPECTED["prompts"]),
                   env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == EXPECTED["tokens"]
    assert not [m for m in out["modules"] if m.startswith("runtime.tools")]
    r = run_python(_LOAD_AND_GENERATE, "runtime.tools.atomic,runtime.tools.writers,runtime.tools.cli,fcntl",
                   ARTIFACT, "random", json.dumps(EXPECTED["prompts"]), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tools = [m for m in out["modules"] if m.startswith("runtime.tools")]
    assert tools == ["runtime.tools", "runtime.tools.random_init"]


_COUNT_OPENS = textwrap.dedent("""
    import collections, json, sys
    opened = collections.Counter()
    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes)) and str(args[0]).endswith(".jaxexport"):
            opened[str(args[0])] += 1
    sys.addaudithook(audit)
    from runtime.engine.model import load
    model = load(sys.argv[1], sys.argv[2])
    model.generate([[1, 2, 3]], 2)
    print(json.dumps(opened))
""")


def test_each_module_file_is_read_once(tmp_path):
    """The bytes whose sha256 is checked are the bytes deserialized: one open per module file
    (Python's audit hook sees every open)."""
    r = run_python(_COUNT_OPENS, ARTIFACT, WEIGHTS, env=subprocess_env(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    opened = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(Path(p).name for p in opened) == ["decode.jaxexport", "prefill.jaxexport"]
    assert set(opened.values()) == {1}, opened


def test_the_jax_pin_and_the_compatibility_window_agree():
    """An artifact's window ends where the runtime's jax pin ends: a window the pin cannot reach
    would promise versions no installed runtime ever ran."""
    from exporter.artifact import compatibility_window

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (jax_req,) = [r for r in deps if re.match(r"jax\s*[<>=]", r)]
    upper = re.search(r"<\s*([0-9.]+)", jax_req).group(1)
    window = compatibility_window(dt.datetime.now(dt.timezone.utc))
    assert parse_version(window["jax_max_exclusive"]) == parse_version(upper)
    import jax

    assert parse_version(window["jax_min"]) <= parse_version(jax.__version__) < parse_version(upper)


def test_concurrent_generate_calls_equal_their_solo_runs(tiny):
    """Several threads generating on one loaded model (each its own request size, seed and
    sampling) get exactly what each request gets alone."""
    model = tiny.model
    requests = [
        dict(prompts=[PROMPTS[0]], max_new_tokens=9, seed=1),
        dict(prompts=PROMPTS, max_new_tokens=7, temperature=0.8, top_k=20, seed=2),
        dict(prompts=[PROMPTS[1], PROMPTS[2]], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3),
        dict(prompts=[PROMPTS[2]] * 5, max_new_tokens=5, min_p=0.1, temperature=0.7, seed=[4, 5, 6, 7, 8]),
    ] * 2
    solo = [model.generate(**r) for r in requests]
    results: dict[int, object] = {}
    start = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        start.wait()
        try:
            results[i] = model.generate(**requests[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [results.get(i) for i in range(len(requests))] == solo


def test_no_assert_as_a_runtime_check():
    """`python -O` strips asserts: exporter/ and runtime/ check with real errors."""
    found = [f"{path.relative_to(REPO)}:{node.lineno}" for part in ("exporter", "runtime")
             for path in sorted((REPO / part).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert found == []
