"""Bad artifacts, versions, weights and requests through the Python API (`runtime.load`).

Every case raises a documented exception type from `runtime.errors` with a one-line message
that names the problem and the fix. The same case tables drive tests/test_errors_cli.py.
Module-level checks (manifest parser, integrity, weights reader) live in test_manifest.py and
test_weights.py; these go through `runtime.load(...)` / `LoadedModel.generate(...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import runtime
from exporter.artifact import write_artifact
from exporter.config import Mamba2Config
from exporter.functions import Limits, ModelFunctions
from runtime.errors import (ArtifactError, CompatibilityError, IntegrityError, Mamba2AOTError,
                            RequestError, WeightsError)
from runtime.format.manifest import MANIFEST_NAME
from runtime.engine.weights import parse_weight_spec
from runtime.tools.random_init import random_weights

TINY_CFG = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=96, state_size=16, head_dim=16,
                        chunk_size=8, name="tiny-errors")
TINY_LIMITS = Limits(max_batch=4, max_prompt_tokens=32, max_new_tokens=16, max_stop_tokens=4, decode_block=16)
PREFILL = "cpu/prefill.jaxexport"
DECODE = "cpu/decode.jaxexport"


# ---------------------------------------------------------------- shared helpers (also used by
# test_errors_cli, test_security and test_interrupt)

_EXPORTED: dict[str, Path] = {}


def exported_artifact(tmp_path_factory, platform: str = "cpu") -> Path:
    """The tiny artifact for `platform`, exported once per session. Copy it before changing it."""
    if platform not in _EXPORTED:
        out = tmp_path_factory.mktemp(f"tiny-{platform}") / "art"
        write_artifact(ModelFunctions(TINY_CFG, jnp.float32, TINY_LIMITS), (platform,), out, force=False)
        _EXPORTED[platform] = out
    return _EXPORTED[platform]


@pytest.fixture(scope="module", autouse=True)
def isolated_compile_cache(tmp_path_factory):
    """Every load in these modules writes its XLA cache to a temp dir, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMBA2_AOT_CACHE_DIR", str(tmp_path_factory.mktemp("xla-cache")))
        yield


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def edit_manifest(art: Path, edit: Callable[[dict], None]) -> None:
    """Apply `edit` to the raw manifest object and write it back without validation."""
    m = read_json(art / MANIFEST_NAME)
    edit(m)
    (art / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


def set_file(art: Path, rel: str, data: bytes, fix_digest: bool = True) -> None:
    """Overwrite an artifact file; with fix_digest, also record its new sha256 and size."""
    (art / rel).write_bytes(data)
    if fix_digest:
        edit_manifest(art, lambda m: m["files"].__setitem__(
            rel, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


def move_member(art: Path, rel: str, new_rel: str) -> None:
    """Make the manifest name `rel` as `new_rel` (both in functions.*.files and in files)."""
    def edit(m):
        for fn in m["functions"].values():
            for plat, r in fn["files"].items():
                if r == rel:
                    fn["files"][plat] = new_rel
        m["files"][new_rel] = m["files"].pop(rel)
    edit_manifest(art, edit)


def one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------- artifact cases


@dataclasses.dataclass(frozen=True)
class Case:
    setup: Callable[[Path, Path], None]  # (artifact copy, a scratch dir outside it)
    exc: type[Mamba2AOTError]
    needles: tuple[str, ...]
    source: str = "cpu"  # which exported artifact the case starts from


def _flip_bit(art: Path, _scratch: Path) -> None:
    data = bytearray((art / PREFILL).read_bytes())
    data[len(data) // 2] ^= 0x10
    (art / PREFILL).write_bytes(bytes(data))


def _truncate(art: Path, _scratch: Path) -> None:
    data = (art / PREFILL).read_bytes()
    (art / PREFILL).write_bytes(data[: len(data) // 2])


def _symlink_file_out(art: Path, scratch: Path) -> None:
    outside = scratch / "prefill-copy.jaxexport"
    shutil.copyfile(art / PREFILL, outside)  # same bytes: only the path can be refused
    (art / PREFILL).unlink()
    (art / PREFILL).symlink_to(outside)


def _symlink_dir_out(art: Path, scratch: Path) -> None:
    outside = scratch / "cpu-copy"
    shutil.copytree(art / "cpu", outside)
    shutil.rmtree(art / "cpu")
    (art / "cpu").symlink_to(outside, target_is_directory=True)


def _dotdot(art: Path, scratch: Path) -> None:
    shutil.copyfile(art / PREFILL, art.parent / "prefill.jaxexport")
    move_member(art, PREFILL, "../prefill.jaxexport")


def _absolute(art: Path, scratch: Path) -> None:
    outside = scratch / "prefill.jaxexport"
    shutil.copyfile(art / PREFILL, outside)
    move_member(art, PREFILL, str(outside))


def _corrupt_stablehlo(art: Path, _scratch: Path) -> None:
    """Garbage in the StableHLO bytecode with an intact envelope and a matching digest."""
    blob = (art / PREFILL).read_bytes()
    module = jax.export.deserialize(bytearray(blob)).mlir_module_serialized
    start = blob.find(module)
    assert start > 0
    set_file(art, PREFILL, blob[:start] + b"\xff" * len(module) + blob[start + len(module):])


def _not_a_dir(art: Path, _scratch: Path) -> None:
    shutil.rmtree(art)
    art.write_text("not an artifact")


def _schema(version: int) -> Callable:
    return lambda art, _s: edit_manifest(art, lambda m: m.__setitem__("schema_version", version))


def _window(lo: str, hi: str) -> Callable:
    return lambda art, _s: edit_manifest(
        art, lambda m: m["compatibility"].update(jax_min=lo, jax_max_exclusive=hi))


JAX = jax.__version__
ARTIFACT_CASES: dict[str, Case] = {
    "missing-dir": Case(lambda a, s: shutil.rmtree(a), ArtifactError, ("no artifact directory",)),
    "not-a-dir": Case(_not_a_dir, ArtifactError, ("is not a directory",)),
    "no-manifest": Case(lambda a, s: (a / MANIFEST_NAME).unlink(), ArtifactError,
                        ("has no manifest.json", "not a mamba2-aot artifact")),
    "missing-file": Case(lambda a, s: (a / DECODE).unlink(), ArtifactError,
                         (f"{DECODE} is missing", "re-export or re-copy")),
    "truncated-file": Case(_truncate, IntegrityError, (PREFILL, "corrupt", "size mismatch", "re-export")),
    "bit-flipped-file": Case(_flip_bit, IntegrityError, (PREFILL, "corrupt", "sha256 mismatch", "re-export")),
    "manifest-not-json": Case(lambda a, s: (a / MANIFEST_NAME).write_text("{oops"), ArtifactError,
                              ("not valid JSON",)),
    "manifest-not-utf8": Case(lambda a, s: (a / MANIFEST_NAME).write_bytes(b"\xff\xfe{}"), ArtifactError,
                              ("not UTF-8",)),
    "manifest-newer-schema": Case(_schema(3), ArtifactError, ("newer mamba2-aot", "upgrade mamba2-aot")),
    "manifest-older-schema": Case(_schema(0), ArtifactError, ("no longer supported", "re-export")),
    "manifest-missing-field": Case(lambda a, s: edit_manifest(a, lambda m: m.pop("limits")), ArtifactError,
                                   ("missing field limits", "re-export")),
    "manifest-missing-nested-field": Case(
        lambda a, s: edit_manifest(a, lambda m: m["compatibility"].pop("jax_min")), ArtifactError,
        ("missing field compatibility.jax_min",)),
    "manifest-newer-fields": Case(
        lambda a, s: edit_manifest(a, lambda m: m.update(quantization={"bits": 4})), ArtifactError,
        ("fields from a newer format", "quantization", "upgrade mamba2-aot")),
    "manifest-bad-weight-spec": Case(
        lambda a, s: edit_manifest(a, lambda m: m["weights"]["tensors"][0].__setitem__("shape", "big")),
        WeightsError, ("invalid weight spec", "re-export")),
    "entry-dotdot": Case(_dotdot, ArtifactError, ("'../prefill.jaxexport'", "points outside the artifact")),
    "entry-absolute": Case(_absolute, ArtifactError, ("points outside the artifact",)),
    "entry-symlink-file-out": Case(_symlink_file_out, ArtifactError, (PREFILL, "points outside the artifact")),
    "entry-symlink-dir-out": Case(_symlink_dir_out, ArtifactError, ("points outside the artifact",)),
    "module-garbage-digest-ok": Case(lambda a, s: set_file(a, PREFILL, b"not a jax.export module" * 8),
                                     ArtifactError, (f"cannot deserialize {PREFILL}", "re-export")),
    "module-bad-stablehlo-digest-ok": Case(_corrupt_stablehlo, ArtifactError,
                                           (f"cannot deserialize {PREFILL}", "re-export")),
    "platform-tpu-only": Case(lambda a, s: None, CompatibilityError,
                              ("platforms [tpu]", "this machine runs cpu", "re-export with --platform cpu"),
                              source="tpu"),
    "jax-too-old": Case(_window("99.0.0", "99.1.0"), CompatibilityError,
                        ("[99.0.0, 99.1.0)", f"this is jax {JAX}", "re-export")),
    "jax-too-new": Case(_window("0.1.0", "0.2.0"), CompatibilityError,
                        ("[0.1.0, 0.2.0)", f"this is jax {JAX}", "re-export")),
    "calling-convention": Case(
        lambda a, s: edit_manifest(a, lambda m: m["serialization"].update(calling_convention_version=999)),
        CompatibilityError, ("calling convention 999", "re-export")),
}


def broken_artifact(name: str, tmp_path: Path, tmp_path_factory) -> Path:
    """A fresh copy of the case's source artifact with the case's damage applied."""
    case = ARTIFACT_CASES[name]
    art = tmp_path / "art"
    shutil.copytree(exported_artifact(tmp_path_factory, case.source), art, symlinks=True)
    scratch = tmp_path / "elsewhere"
    scratch.mkdir()
    case.setup(art, scratch)
    return art


@pytest.mark.parametrize("name", list(ARTIFACT_CASES))
def test_artifact_cases(name, tmp_path, tmp_path_factory):
    case = ARTIFACT_CASES[name]
    art = broken_artifact(name, tmp_path, tmp_path_factory)
    with pytest.raises(case.exc) as e:
        runtime.load(art, "random")
    message = one_line(str(e.value))
    for needle in case.needles:
        assert needle in message, (needle, message)


def test_intact_copy_loads(tmp_path, tmp_path_factory):
    """The cases above start from an artifact that loads (so each failure is the case's own)."""
    art = tmp_path / "art"
    shutil.copytree(exported_artifact(tmp_path_factory), art)
    model = runtime.load(art, "random")
    assert model.limits["vocab_size"] == TINY_CFG.vocab_size


# ---------------------------------------------------------------- fuzzing through load


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(exported_artifact(tmp_path_factory), art)
    return art


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, value in ops:
        if not b:
            b = bytearray(b"\x00")
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= 1 << (value % 8)
        elif kind == "set":
            b[i] = value
        elif kind == "insert":  # never digits: a manifest shape must not grow to gigabytes
            b[i:i] = bytes([value if not 0x30 <= value <= 0x39 else 0x20]) * (1 + value % 4)
        elif kind == "delete":
            del b[i:i + 1 + value % 8]
        elif kind == "zero":
            b[i:i + 1 + value % 32] = bytes(len(b[i:i + 1 + value % 32]))
        else:  # truncate
            del b[i:]
    return bytes(b)


_OPS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "zero", "truncate"]),
                          st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_fuzz_manifest_bytes_through_load(fuzz_dir, ops):
    original = (_EXPORTED["cpu"] / MANIFEST_NAME).read_bytes()
    (fuzz_dir / MANIFEST_NAME).write_bytes(_mutate(original, ops))
    try:
        runtime.load(fuzz_dir, "random")
    except Mamba2AOTError as e:
        one_line(str(e))


def _paths(node, prefix=()):
    """Every key path in a JSON object, depth first."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["cpu", "tpu", "float32", "../x", "/etc/passwd", "0.10.2"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 10**6), value=_JSON, delete=st.booleans())
def test_fuzz_manifest_values_through_load(fuzz_dir, pick, value, delete):
    """Valid JSON with one value replaced (or deleted) anywhere: past the parser into load."""
    m = read_json(_EXPORTED["cpu"] / MANIFEST_NAME)
    paths = list(_paths(m))[1:]
    *parents, last = paths[pick % len(paths)]
    node = m
    for k in parents:
        node = node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    (fuzz_dir / MANIFEST_NAME).write_text(json.dumps(m))
    try:
        runtime.load(fuzz_dir, "random")
    except Mamba2AOTError as e:
        one_line(str(e))


# The sha256 recorded in the manifest is the integrity boundary: any change to a module's bytes
# must be refused before native code (MLIR's C++ bytecode reader) ever parses them. Forging the
# digest as well would only fuzz that parser, which can crash the process on hostile input
# (seen in CI); forged-digest corruption is covered by the deterministic cases above
# (flatbuffer garbage, StableHLO with a bad header), which fail cleanly.
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=st.sampled_from([PREFILL, DECODE]), ops=_OPS)
def test_fuzz_module_bytes(fuzz_dir, rel, ops):
    source = _EXPORTED["cpu"]
    shutil.copyfile(source / MANIFEST_NAME, fuzz_dir / MANIFEST_NAME)
    for name in (PREFILL, DECODE):
        shutil.copyfile(source / name, fuzz_dir / name)
    original = (source / rel).read_bytes()
    mutated = _mutate(original, ops)
    (fuzz_dir / rel).write_bytes(mutated)  # the manifest keeps the original digest
    if mutated == original:
        return
    with pytest.raises(IntegrityError) as err:
        runtime.load(fuzz_dir, "random")
    one_line(str(err.value))


# ---------------------------------------------------------------- weights


def _good_weights() -> dict[str, np.ndarray]:
    spec = parse_weight_spec(read_json(_EXPORTED["cpu"] / MANIFEST_NAME)["weights"])
    return random_weights(spec, 0)


def _with(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        w = _good_weights()
        change(w)
        save_file(w, str(root / "model.safetensors"))
        return root / "model.safetensors"
    return make


def _truncated(root: Path) -> Path:
    path = _with(lambda w: None)(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _config_mismatch(root: Path) -> Path:
    _with(lambda w: None)(root)
    hf = {"model_type": "mamba2", **TINY_CFG.to_dict(), "hidden_size": 128}
    hf.pop("name")
    (root / "config.json").write_text(json.dumps(hf))
    return root


def _set(name: str, value) -> Callable[[dict], None]:
    return lambda w: w.__setitem__(name, value)


def _poison(name: str, value: float) -> Callable[[dict], None]:
    def change(w):
        w[name] = w[name].copy()
        w[name].flat[3] = value
    return change


EMB = "backbone.embeddings.weight"
NORM_F = "backbone.norm_f.weight"
# name -> (make(dir) -> the --weights path, message needles); every one raises WeightsError.
WEIGHT_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing-tensor": (_with(lambda w: w.pop(NORM_F)), (f"missing {NORM_F} [64]", "does not match")),
    "extra-tensor": (_with(_set("backbone.extra.weight", np.zeros(3, np.float32))),
                     ("unexpected backbone.extra.weight [3]",)),
    "misshaped-tensor": (_with(_set(EMB, np.zeros((95, 64), np.float32))),
                         (f"{EMB} has shape [95, 64], expected [96, 64]",)),
    "wrong-dtype": (_with(_set(NORM_F, np.ones(64, np.int32))),
                    (f"{NORM_F} has dtype int32, expected float32",)),
    "nan": (_with(_poison(EMB, math.nan)), ("non-finite", f"{EMB} has 1 non-finite values (1 NaN, 0 Inf)")),
    "inf": (_with(_poison(NORM_F, -math.inf)), ("non-finite", "(0 NaN, 1 Inf)")),
    "truncated-file": (_truncated, ("not a valid safetensors file", "re-download or re-convert")),
    "config-mismatch": (_config_mismatch, ("hidden_size 128 != 64", "exported for another model")),
    "no-such-path": (lambda root: root / "nope.safetensors", ("no checkpoint at",)),
    "empty-dir": (lambda root: root, ("has no model.safetensors",)),
}


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict[str, Path]:
    """{case: a bad --weights path} for the tiny cpu artifact."""
    exported_artifact(tmp_path_factory)
    out = {}
    for name, (make, _) in WEIGHT_CASES.items():
        out[name] = make(tmp_path_factory.mktemp(f"w-{name}"))
    return out


@pytest.mark.parametrize("name", list(WEIGHT_CASES))
def test_weight_cases(name, bad_weights, tmp_path_factory):
    with pytest.raises(WeightsError) as e:
        runtime.load(exported_artifact(tmp_path_factory), bad_weights[name])
    message = one_line(str(e.value))
    for needle in WEIGHT_CASES[name][1]:
        assert needle in message, (needle, message)


def test_good_weights_load(tmp_path, tmp_path_factory):
    art = exported_artifact(tmp_path_factory)
    path = _with(lambda w: None)(tmp_path)
    model = runtime.load(art, path)
    assert model.weights_source == str(path)
    assert set(model.params) == set(_good_weights())


# ---------------------------------------------------------------- requests

nan = math.nan
# (name, positional prompts, keyword arguments, message needle); every one raises RequestError.
REQUEST_CASES = [
    ("empty-prompt", [[]], {}, "prompt 0 is empty"),
    ("no-prompts", [], {}, "prompts must be a non-empty list"),
    ("prompts-not-a-list", 7, {}, "prompts must be a non-empty list"),
    ("negative-id", [[1, -1]], {}, "token id -1 outside the vocabulary [0, 96)"),
    ("id-at-vocab", [[1], [96]], {}, "prompt 1 has token id 96 outside the vocabulary [0, 96)"),
    ("float-id", [[1, 2.5]], {}, "non-integer token ids"),
    ("inf-id", [[1, math.inf]], {}, "not a list of integer token ids"),
    ("prompt-over-limit", [[1] * 33], {}, "33 tokens, over the artifact's limit of 32"),
    ("batch-over-limit", [[1]] * 5, {}, "batch of 5 prompts is over the artifact's limit of 4"),
    ("max-new-tokens-0", [[1]], {"max_new_tokens": 0}, "max_new_tokens must be in [1, 16]"),
    ("max-new-tokens-negative", [[1]], {"max_new_tokens": -4}, "max_new_tokens must be in [1, 16]"),
    ("max-new-tokens-over-cap", [[1]], {"max_new_tokens": 17}, "max_new_tokens must be in [1, 16]"),
    ("max-new-tokens-str", [[1]], {"max_new_tokens": "8"}, "max_new_tokens must be in [1, 16]"),
    ("temperature-negative", [[1]], {"temperature": -0.5}, "temperature must be >= 0"),
    ("temperature-nan", [[1]], {"temperature": nan}, "temperature must be >= 0"),
    ("temperature-str", [[1]], {"temperature": "hot"}, "temperature must be a number"),
    ("top-p-0", [[1]], {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ("top-p-over-1", [[1]], {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ("top-p-nan", [[1]], {"top_p": nan}, "top_p must be in (0, 1]"),
    ("top-k-negative", [[1]], {"top_k": -1}, "top_k must be an integer >= 0"),
    ("top-k-fraction", [[1]], {"top_k": 2.5}, "top_k must be an integer >= 0"),
    ("top-k-huge", [[1]], {"top_k": 2**40}, "top_k must be an integer >= 0"),
    ("top-k-none", [[1]], {"top_k": None}, "top_k must be a number"),
    ("min-p-1", [[1]], {"min_p": 1.0}, "min_p must be in [0, 1)"),
    ("min-p-negative", [[1]], {"min_p": -0.1}, "min_p must be in [0, 1)"),
    ("stop-outside-vocab", [[1]], {"stop": [96]}, "stop token 96 is outside the vocabulary"),
    ("stop-over-limit", [[1]], {"stop": [1, 2, 3, 4, 5]}, "5 stop tokens, over the artifact's limit of 4"),
    ("stop-not-ids", [[1]], {"stop": ["eos"]}, "stop must be a list of integer token ids"),
    ("seed-negative", [[1]], {"seed": -1}, "seed must be an integer >= 0"),
    ("seed-str", [[1]], {"seed": "x"}, "seed must be an integer >= 0"),
    ("seed-list-wrong-length", [[1], [2]], {"seed": [1, 2, 3]}, "a list of 2 of them"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return runtime.load(exported_artifact(tmp_path_factory), "random")


@pytest.mark.parametrize("name, prompts, kw, needle", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_request_cases(model, name, prompts, kw, needle):
    kw = dict(kw)
    n = kw.pop("max_new_tokens", 4)
    # Requests are checked before any device work: no compilation happens in these tests.
    with pytest.raises(RequestError) as e:
        model.generate(prompts, n, **kw)
    assert needle in one_line(str(e.value))
    with pytest.raises(RequestError):
        next(model.stream(prompts, n, **kw))


def test_stream_block(model):
    with pytest.raises(RequestError, match="block must be a positive integer"):
        next(model.stream([[1]], 4, block=0))


def test_errors_are_documented_types():
    """Every exception the API raises for user errors derives from runtime.errors.Mamba2AOTError."""
    for exc in (ArtifactError, IntegrityError, CompatibilityError, WeightsError, RequestError):
        assert issubclass(exc, Mamba2AOTError) and exc.__doc__
    assert issubclass(IntegrityError, ArtifactError)
    assert runtime.load is runtime.engine.model.load
