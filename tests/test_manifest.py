"""Manifest schema validation (v2, and v1 still read), integrity checks, and fuzzing (only
ArtifactError may escape)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import ArtifactError, IntegrityError
from runtime.format.integrity import check_member_name, file_record, safe_member, sha256_file, verify_files
from runtime.format.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    decode_manifest,
    parse_manifest,
    read_manifest,
)
from runtime.tools.writers import write_manifest

# ---------------------------------------------------------------- fake artifact helper (shared)

FAKE_FILES = {
    "prefill.cpu.jaxexport": b"fake serialized prefill " * 40,
    "decode.cpu.jaxexport": b"fake serialized decode " * 30,
}


def _tensor(name, shape, dtype):
    return {"name": name, "shape": shape, "dtype": dtype}


def fake_manifest(files: dict[str, bytes] = FAKE_FILES, schema: int = SCHEMA_VERSION) -> dict:
    """A valid manifest dict (schema 2, or 1) whose `files` records describe `files`."""
    obj = {
        "format": FORMAT_NAME,
        "schema_version": schema,
        "created": "2025-06-01T12:00:00+00:00",
        "producer": {"package": "mamba2-aot", "version": "0.1.0", "jax": "0.10.2", "jaxlib": "0.10.2"},
        "serialization": {"jax_export_version": 3, "calling_convention_version": 10},
        "compatibility": {"jax_min": "0.10.0", "jax_max_exclusive": "0.11.0", "expires": "2099-12-31"},
        "platforms": ["cpu"],
        "dtype": "float32",
        "model": {"name": "tiny", "config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
                                             "time_step_limit": [0.0, "Infinity"]}},
        "tokens": {"bos_id": 0, "eos_id": 0, "pad_id": None},
        "limits": {"max_batch": 4, "max_prompt_tokens": 64, "max_new_tokens": 32, "max_stop_tokens": 4,
                   "vocab_size": 128},
        "buckets": {"prompt": [16, 64], "batch": [1, 2, 4]},
        "functions": {
            "prefill": {
                "inputs": [_tensor("tokens", ["b", 64], "int32"), _tensor("lengths", ["b"], "int32"),
                           _tensor("state/ssm", [2, "b", 4, 8], "float32")],
                "outputs": [_tensor("logits", ["b", 128], "float32")],
                "files": {"cpu": "prefill.cpu.jaxexport"},
            },
            "decode": {
                "inputs": [_tensor("token", ["b"], "int32")],
                "outputs": [_tensor("tokens", ["b", 32], "int32")],
                "files": {"cpu": "decode.cpu.jaxexport"},
            },
        },
        "weights": {"tensors": [{"name": "backbone.embeddings.weight", "shape": [128, 64], "dtype": "float32"}]},
        "mesh": None,
        "files": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for rel, data in files.items()},
    }
    if schema >= 2:
        obj["semantics_version"] = 2
        obj["memory"] = {"prefill_activation_bytes": 1 << 20}
        obj["limits"].update(decode_block=16, max_prefill_tokens=256, max_context=None)
    return obj


def make_artifact(root: Path, name: str = "artifact", manifest: dict | None = None,
                  files: dict[str, bytes] = FAKE_FILES) -> Path:
    """Write fake files plus a manifest (valid unless `manifest` says otherwise) under root/name."""
    d = Path(root) / name
    d.mkdir(parents=True)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    m = fake_manifest(files) if manifest is None else manifest
    (d / MANIFEST_NAME).write_text(json.dumps(m, indent=2))
    return d


# ---------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    for rel, data in FAKE_FILES.items():
        (d / rel).write_bytes(data)
    obj = fake_manifest()
    write_manifest(d, obj)
    m = read_manifest(d)
    assert isinstance(m, Manifest)
    assert m.raw == obj
    assert m.platforms == ("cpu",)
    assert m.limits.vocab_size == 128 and m.tokens.pad_id is None
    assert m.buckets.prompt == (16, 64)
    assert m.functions["prefill"].inputs[0].shape == ("b", 64)
    assert m.functions["decode"].files == {"cpu": "decode.cpu.jaxexport"}
    assert m.mesh is None
    assert m.total_bytes == sum(map(len, FAKE_FILES.values()))
    verify_files(d, m)
    verify_files(d, m, names=["decode.cpu.jaxexport"])
    assert not [p for p in os.listdir(d) if ".tmp-" in p]


def test_mesh_optional_and_valid():
    obj = fake_manifest()
    del obj["mesh"]
    assert parse_manifest(obj).mesh is None
    obj["mesh"] = {"axis_names": ["data", "model"], "shape": [1, 2], "weight_shardings": {}, "cache_shardings": {}}
    assert parse_manifest(obj).mesh.shape == (1, 2)
    obj["mesh"]["shape"] = [2]
    with pytest.raises(ArtifactError, match="mesh.shape"):
        parse_manifest(obj)


def test_write_manifest_validates_first(tmp_path):
    obj = fake_manifest()
    obj["dtype"] = "float64"
    with pytest.raises(ArtifactError, match="dtype"):
        write_manifest(tmp_path, obj)
    assert not (tmp_path / MANIFEST_NAME).exists()
    obj = fake_manifest()
    obj["model"]["bad"] = float("inf")
    with pytest.raises(ArtifactError, match="JSON"):
        write_manifest(tmp_path, obj)
    assert os.listdir(tmp_path) == []


def test_write_manifest_accepts_tuples(tmp_path):
    obj = fake_manifest()
    obj["buckets"]["prompt"] = (16, 64)
    write_manifest(tmp_path, obj)
    assert read_manifest(tmp_path).buckets.prompt == (16, 64)


# ---------------------------------------------------------------- bad manifests


def test_missing_dir_and_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no artifact directory at"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="has no manifest.json: not a mamba2-aot artifact"):
        read_manifest(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        read_manifest(tmp_path / "f")


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"[1, 2]", b'"s"', b"\xff\xfe{}", b'{"a": NaN}'])
def test_not_a_json_object(tmp_path, data):
    (tmp_path / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ArtifactError) as e:
        read_manifest(tmp_path)
    assert "\n" not in str(e.value)


def test_newer_schema():
    obj = fake_manifest()
    obj["schema_version"] = 3
    obj["something_new"] = 1
    with pytest.raises(ArtifactError, match=r"written by a newer mamba2-aot \(schema 3, this reads 2\): upgrade"):
        parse_manifest(obj)


def test_schema_1_still_reads_with_its_limits_derived():
    m = parse_manifest(fake_manifest(schema=1))
    assert m.schema_version == 1 and m.semantics_version == 1 and m.memory is None
    assert (m.limits.decode_block, m.limits.max_prefill_tokens, m.limits.max_context) == (32, 4 * 64, None)
    v1 = fake_manifest(schema=1)
    v1["semantics_version"] = 2  # a schema-2 field in a schema-1 manifest is refused
    with pytest.raises(ArtifactError, match="semantics_version"):
        parse_manifest(v1)


@pytest.mark.parametrize("value", [0, 3, "2", None, True])
def test_unknown_semantics_version(value):
    obj = fake_manifest()
    obj["semantics_version"] = value
    with pytest.raises(ArtifactError, match="semantics"):
        parse_manifest(obj)


@pytest.mark.parametrize("value", [0, -1, "1", 1.0, None, True])
def test_older_or_bad_schema(value):
    obj = fake_manifest()
    obj["schema_version"] = value
    with pytest.raises(ArtifactError, match="schema"):
        parse_manifest(obj)


def test_wrong_format():
    obj = fake_manifest()
    obj["format"] = "something-else"
    with pytest.raises(ArtifactError, match="not a mamba2-aot artifact"):
        parse_manifest(obj)


@pytest.mark.parametrize("key", [k for k in fake_manifest() if k != "mesh"])
def test_missing_top_level_field(key):
    obj = fake_manifest()
    del obj[key]
    with pytest.raises(ArtifactError, match=key):
        parse_manifest(obj)


@pytest.mark.parametrize("path", [
    ("producer", "jax"), ("limits", "max_batch"), ("tokens", "eos_id"), ("functions", "decode"),
    ("functions", "prefill", "files"), ("weights", "tensors"), ("compatibility", "expires"),
])
def test_missing_nested_field(path):
    obj = fake_manifest()
    node = obj
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    with pytest.raises(ArtifactError, match=".".join(path[-2:]) if path[0] != "functions" else path[-1]):
        parse_manifest(obj)


def test_extra_fields_from_newer_format():
    obj = fake_manifest()
    obj["quantization"] = {"bits": 4}
    obj["speculative"] = True
    with pytest.raises(ArtifactError, match=r"newer format \(quantization, speculative\): upgrade"):
        parse_manifest(obj)
    obj = fake_manifest()
    obj["limits"]["max_threads"] = 3
    with pytest.raises(ArtifactError, match=r"limits.max_threads"):
        parse_manifest(obj)


@pytest.mark.parametrize("mutate, field", [
    (lambda m: m["limits"].update(max_batch=0), "limits.max_batch"),
    (lambda m: m["limits"].update(max_batch=True), "limits.max_batch"),
    (lambda m: m["limits"].update(vocab_size=2.5), "limits.vocab_size"),
    (lambda m: m["buckets"].update(prompt=[64, 16]), "buckets.prompt"),
    (lambda m: m["buckets"].update(batch=[]), "buckets.batch"),
    (lambda m: m.update(platforms=["gpu"]), "platforms"),
    (lambda m: m.update(platforms=[]), "platforms"),
    (lambda m: m.update(dtype="float16"), "dtype"),
    (lambda m: m.update(created="yesterday"), "created"),
    (lambda m: m.update(created="2025-06-01T12:00:00+02:00"), "created"),
    (lambda m: m["tokens"].update(eos_id=128), "tokens.eos_id"),
    (lambda m: m["compatibility"].update(jax_min="banana"), "compatibility.jax_min"),
    (lambda m: m["compatibility"].update(jax_max_exclusive="0.9"), "compatibility.jax_max_exclusive"),
    (lambda m: m["compatibility"].update(expires="2025-13-01"), "compatibility.expires"),
    (lambda m: m["functions"]["prefill"]["inputs"][0].update(dtype="int3"), "functions.prefill.inputs"),
    (lambda m: m["functions"]["prefill"]["inputs"][0].update(shape=[-1]), "functions.prefill.inputs"),
    (lambda m: m["functions"]["prefill"]["files"].update(cuda="x"), "functions.prefill.files"),
    (lambda m: m["files"]["prefill.cpu.jaxexport"].update(sha256="ABC"), "sha256"),
    (lambda m: m["files"].pop("decode.cpu.jaxexport"), "not listed in files"),
    (lambda m: m.update(weights={"tensors": {}}), "weights.tensors"),
    (lambda m: m.update(model=[]), "model"),
])
def test_wrong_values_name_the_field(mutate, field):
    obj = fake_manifest()
    mutate(obj)
    with pytest.raises(ArtifactError) as e:
        parse_manifest(obj)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_platform_without_file():
    obj = fake_manifest()
    obj["platforms"] = ["cpu", "cuda"]
    with pytest.raises(ArtifactError, match="no file for platform cuda"):
        parse_manifest(obj)


# ---------------------------------------------------------------- unsafe paths


@pytest.mark.parametrize("rel", ["../evil", "a/../../evil", "/etc/passwd", "", "a\\b", "a//b", "./a", "a/."])
def test_unsafe_names_refused(tmp_path, rel):
    with pytest.raises(ArtifactError):
        safe_member(tmp_path, rel)
    obj = fake_manifest()
    obj["files"][rel] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(ArtifactError):
        parse_manifest(obj)


def test_outside_message(tmp_path):
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        safe_member(tmp_path, "../x")
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        check_member_name("/abs")


def test_symlink_leading_out_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(FAKE_FILES["decode.cpu.jaxexport"])
    art = make_artifact(tmp_path, files={"prefill.cpu.jaxexport": FAKE_FILES["prefill.cpu.jaxexport"]},
                        manifest=fake_manifest())
    (art / "decode.cpu.jaxexport").symlink_to(outside / "secret")
    (art / "sub").symlink_to(outside)
    m = read_manifest(art)
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        verify_files(art, m)
    with pytest.raises(ArtifactError, match="points outside"):
        safe_member(art, "sub/secret")
    (art / "inner").symlink_to(art / "prefill.cpu.jaxexport")  # a link inside stays fine
    assert safe_member(art, "inner") == (art / "prefill.cpu.jaxexport").resolve()


# ---------------------------------------------------------------- integrity


def test_file_record_and_sha(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc" * 1_000_000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 1_000_000).hexdigest()
    assert file_record(p) == {"sha256": sha256_file(p), "bytes": 3_000_000}


def test_truncated_file(tmp_path):
    art = make_artifact(tmp_path)
    p = art / "prefill.cpu.jaxexport"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="prefill.cpu.jaxexport is corrupt"):
        verify_files(art, read_manifest(art))


def test_bit_flipped_file(tmp_path):
    art = make_artifact(tmp_path)
    p = art / "decode.cpu.jaxexport"
    data = bytearray(p.read_bytes())
    data[7] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"decode.cpu.jaxexport is corrupt \(sha256 mismatch\): re-export"):
        verify_files(art, read_manifest(art))
    verify_files(art, read_manifest(art), names=["prefill.cpu.jaxexport"])  # the other is fine


def test_missing_file(tmp_path):
    art = make_artifact(tmp_path)
    (art / "decode.cpu.jaxexport").unlink()
    with pytest.raises(ArtifactError, match="artifact file decode.cpu.jaxexport is missing"):
        verify_files(art, read_manifest(art))
    with pytest.raises(ArtifactError, match="not listed"):
        verify_files(art, read_manifest(art), names=["other"])


# ---------------------------------------------------------------- fuzzing

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every (path) to a value inside a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_ALL_PATHS = list(_paths(fake_manifest()))[1:]


def _parse_or_artifact_error(obj):
    try:
        parse_manifest(obj)
    except ArtifactError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), st.sampled_from(["set", "delete", "add"]), _json),
                min_size=1, max_size=3), st.text(max_size=6))
def test_fuzz_field_values(edits, new_key):
    obj = fake_manifest()
    for path, op, value in edits:
        node = obj
        try:
            for k in path[:-1]:
                node = node[k]
            if op == "set":
                node[path[-1]] = copy.deepcopy(value)
            elif op == "delete":
                del node[path[-1]]
            elif isinstance(node, dict):
                node[new_key] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit changed the shape of the tree
    _parse_or_artifact_error(obj)


@settings(max_examples=100, deadline=None)
@given(_json)
def test_fuzz_whole_manifest(value):
    _parse_or_artifact_error(value)


_MANIFEST_BYTES = json.dumps(fake_manifest(), indent=2).encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_MANIFEST_BYTES) - 1), st.sampled_from(["flip", "insert", "delete"]),
                          st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_manifest_bytes(mutations):
    data = bytearray(_MANIFEST_BYTES)
    for pos, op, byte in mutations:
        pos = min(pos, len(data) - 1)
        if op == "flip":
            data[pos] ^= 1 << (byte % 8)
        elif op == "insert":
            data.insert(pos, byte)
        else:
            del data[pos]
    try:
        decode_manifest(bytes(data))
    except ArtifactError as e:
        assert "\n" not in str(e)


def test_deeply_nested_json(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path)
    obj = fake_manifest()
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    obj["model"]["deep"] = deep
    with pytest.raises(ArtifactError):
        write_manifest(tmp_path, obj)


# ---------------------------------------------------------------- compatibility checks (compat.py)


def test_parse_version_order():
    from runtime.format.compat import parse_version

    order = ["0.6.0.dev1", "0.6.0a1", "0.6.0rc1.dev2", "0.6.0rc1", "0.6.0", "0.6.0.post1", "0.6.1", "0.10.2", "0.11"]
    keys = [parse_version(v) for v in order]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert parse_version("0.10.2+cuda12") == parse_version("0.10.2")
    for bad in ("", "x", "1..2", "1.2.3.4.5"):
        with pytest.raises(ValueError):
            parse_version(bad)


def test_jax_window_and_calling_convention(monkeypatch):
    import jax

    from runtime.format.compat import check_compatibility, in_jax_window
    from runtime.errors import CompatibilityError

    assert check_compatibility(parse_manifest(fake_manifest()), backend="cpu") == []
    obj = fake_manifest()
    obj["compatibility"].update(jax_min="0.4.30", jax_max_exclusive="0.5.0")
    m = parse_manifest(obj)
    assert not in_jax_window(m, jax.__version__) and in_jax_window(m, "0.4.35")
    with pytest.raises(CompatibilityError, match=r"supports jax \[0.4.30, 0.5.0\); this is jax .*: re-export"):
        check_compatibility(m)
    obj = fake_manifest()
    obj["serialization"]["calling_convention_version"] = 1
    with pytest.raises(CompatibilityError, match="calling convention 1"):
        check_compatibility(parse_manifest(obj))


def test_platform_and_expiry():
    import datetime as dt

    from runtime.format.compat import check_platform, current_platform, expiry_warning
    from runtime.errors import CompatibilityError

    m = parse_manifest(fake_manifest())
    assert current_platform() in ("cpu", "cuda", "rocm", "tpu")
    assert check_platform(m, "cpu") == "cpu"
    with pytest.raises(CompatibilityError, match=r"platforms \[cpu\] but this machine runs cuda: re-export with --platform cuda"):
        check_platform(m, "cuda")  # names as current_platform gives them (jax's "gpu" is mapped there)
    assert expiry_warning(m) is None
    assert "passed its compatibility date 2099-12-31" in expiry_warning(m, today=dt.date(2100, 1, 1))
