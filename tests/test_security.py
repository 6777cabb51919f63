"""Nothing is ever unpickled, and no compiled executable is ever shipped or loaded.

* A static scan of the `runtime/` and `exporter/` sources (code only: comments and docstrings
  may say "pickle") for pickle-family modules, `torch.load`, `allow_pickle=True` and jax's
  `serialize_executable` (executables embed machine code: an artifact holds only portable
  StableHLO from `jax.export`, which is compiled on the machine that runs it). The persistent
  XLA compilation cache the runtime turns on (runtime/compile_cache.py) is jax's own cache of
  executables it compiled itself on this machine; it is not part of an artifact.
* A pickle-only checkpoint (`pytorch_model.bin`, `.pt`) is refused by the API and the CLI with
  a message saying pickle is never loaded; a planted payload proves it was not unpickled.
* A whole load from safetensors works with every pickle entry point booby-trapped.
"""

from __future__ import annotations

import ast
import io
import pickle
import tokenize
from pathlib import Path

import pytest
from safetensors.numpy import save_file

import runtime
from runtime.errors import WeightsError
from test_errors_api import _good_weights, exported_artifact, isolated_compile_cache  # noqa: F401
from test_errors_cli import cli, error_line

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("runtime", "exporter")
# Modules that unpickle (or wrap pickle), and jax's executable (de)serialization.
FORBIDDEN_NAMES = frozenset({
    "pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "pickletools",
    "serialize_executable", "deserialize_and_load",
})


def forbidden_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every pickle / executable-serialization use in a Python source, as 'file:line: what'."""
    found = []
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for tok in tokens:  # identifiers only: strings and comments are not code
        if tok.type == tokenize.NAME and tok.string in FORBIDDEN_NAMES:
            found.append(f"{filename}:{tok.start[0]}: {tok.string}")
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            func = node.func
            # torch.load / torch.serialization.load unpickle by default
            if isinstance(func, ast.Attribute) and func.attr == "load":
                base = func.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    found.append(f"{filename}:{node.lineno}: torch.load")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{filename}:{node.lineno}: allow_pickle={ast.unparse(kw.value)}")
            # importlib.import_module("pickle"), __import__("dill")
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                if str(node.args[0].value).split(".")[0] in FORBIDDEN_NAMES | {"torch"}:
                    found.append(f"{filename}:{node.lineno}: import of {node.args[0].value}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in modules:
                if m.split(".")[-1] in FORBIDDEN_NAMES or m == "torch.serialization":
                    found.append(f"{filename}:{node.lineno}: import {m}")
    return found


def test_sources_never_unpickle_or_ship_executables():
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 10  # the scan sees the real tree
    found = [hit for p in files for hit in forbidden_uses(p.read_text(), str(p.relative_to(REPO)))]
    assert found == [], "pickle or executable serialization in the runtime/exporter sources:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import cloudpickle as cp",
    "from dill import loads",
    "import _pickle",
    "x = torch.load(path)",
    "x = torch.serialization.load(path)",
    "np.load(path, allow_pickle=True)",
    "np.load(path, allow_pickle=flag)",
    "from jax.experimental import serialize_executable",
    "from jax.experimental.serialize_executable import deserialize_and_load",
    "m = importlib.import_module('pickle')",
    "obj = joblib.load(f)",
])
def test_scanner_catches(snippet):
    assert forbidden_uses(snippet), snippet


@pytest.mark.parametrize("snippet", [
    '"""Never unpickles: pickle checkpoints are refused."""',
    "# no pickle here",
    "_PICKLE_SUFFIXES = ('.bin', '.pt')",
    "def _pickle_refusal(what): return what",
    "np.load(path, allow_pickle=False)",
    "exported = jax.export.deserialize(blob)",
])
def test_scanner_allows(snippet):
    assert forbidden_uses(snippet) == [], snippet


# ---------------------------------------------------------------- pickle checkpoints refused


class _Payload:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_dir(root: Path, name: str = "pytorch_model.bin", with_config: bool = True) -> tuple[Path, Path]:
    marker = root / "UNPICKLED"
    d = root / "ckpt"
    d.mkdir()
    (d / name).write_bytes(pickle.dumps({"backbone.embeddings.weight": _Payload(marker)}))
    if with_config:
        (d / "config.json").write_text('{"model_type": "mamba2"}')
    return d, marker


@pytest.mark.parametrize("target", ["bin-only-dir", "hf-dir", "bin-file", "pt-file"])
def test_pickle_checkpoint_refused_by_api(target, tmp_path, tmp_path_factory):
    name = "model.pt" if target == "pt-file" else "pytorch_model.bin"
    d, marker = _pickle_dir(tmp_path, name, with_config=target != "bin-only-dir")
    weights = d if target.endswith("dir") else d / name
    with pytest.raises(WeightsError) as e:
        runtime.load(exported_artifact(tmp_path_factory), weights)
    message = str(e.value)
    assert "pickle" in message and "never loaded" in message and "convert it to safetensors" in message
    assert "\n" not in message
    assert not marker.exists()


def test_pickle_checkpoint_refused_by_cli(capfd, tmp_path, tmp_path_factory):
    d, marker = _pickle_dir(tmp_path, with_config=False)
    code, out, err = cli(capfd, "generate", exported_artifact(tmp_path_factory), "--weights", d,
                         "--prompt-ids", "1,2", "--max-new-tokens", "2")
    error_line(code, err, "pytorch_model.bin", "pickle", "never loaded", "safetensors")
    assert out == "" and not marker.exists()


def test_load_never_calls_pickle(tmp_path, tmp_path_factory, monkeypatch):
    """A full load (manifest, modules, safetensors weights) with pickle booby-trapped."""
    def trap(*a, **k):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap)
    art = exported_artifact(tmp_path_factory)
    save_file(_good_weights(), str(tmp_path / "model.safetensors"))
    model = runtime.load(art, tmp_path / "model.safetensors")
    assert model.params
