"""The artifact manifest (`manifest.json`): schema versions 1 and 2, validation and encoding.

An artifact is a directory holding `manifest.json` plus the files it lists. The manifest is a
UTF-8 JSON object (standard JSON: no NaN/Infinity) with exactly these top-level keys, all
required except `mesh`:

    format          "mamba2-aot-artifact"
    schema_version  2 (an int; 1 is still read; a higher one means a newer mamba2-aot wrote it)
    semantics_version  (schema 2 only; schema 1 means 1) the calling convention of the functions:
                    1: prefill(params, tokens, lengths) -> (logits, state); decode with scalar
                       budget/start_step/sampling settings and stop_ids[S];
                    2: prefill(params, state, tokens, lengths) -> (logits, state): continues each
                       row from its state (all zeros = a fresh sequence); decode with per-row
                       budget[b], steps[b], sampling settings [b] and stop_ids[b, S]; inactive rows
                       keep their state. Every state leaf has one dimension named "b".
    created         ISO-8601 UTC timestamp, e.g. "2025-01-31T12:00:00+00:00" or "...Z"
    producer        {"package": str, "version": str, "jax": str, "jaxlib": str}
    serialization   {"jax_export_version": int, "calling_convention_version": int}
    compatibility   {"jax_min": str, "jax_max_exclusive": str, "expires": "YYYY-MM-DD"}
                    the artifact runs on jax_min <= jax < jax_max_exclusive
    platforms       non-empty list of distinct names from "cpu", "cuda", "rocm", "tpu"
    dtype           "float32" | "bfloat16"
    model           object, opaque to the runtime (model name, config, ...)
    tokens          {"bos_id": int|null, "eos_id": int|null, "pad_id": int|null}, ids < vocab_size
    limits          {"max_batch", "max_prompt_tokens", "max_new_tokens", "max_stop_tokens",
                     "vocab_size"}: positive ints; schema 2 adds "decode_block" (tokens per decode
                     call: the width of its output), "max_prefill_tokens" (batch x length of one
                     prefill call: bounds its memory) and "max_context" (null, or the most tokens
                     one sequence may hold, e.g. a KV cache's capacity)
    memory          (schema 2) {"prefill_activation_bytes": int >= 0}: the exporter's bound on the
                    temporaries of the largest prefill call
    buckets         {"prompt": [int], "batch": [int]}: non-empty, positive, strictly ascending;
                    a request is padded to the smallest bucket >= its size
    functions       name -> {"inputs": [tensor], "outputs": [tensor], "files": {platform: path}}
                    with tensor = {"name": str, "shape": [int >= 0 | str symbol], "dtype": str};
                    "prefill" and "decode" are required; every manifest platform needs a file
    weights         the weight specification: an object with a "tensors" list (checked elsewhere)
    mesh            optional, null or {"axis_names": [str], "shape": [int],
                    "weight_shardings": object}; a "cache_shardings" object (written by
                    earlier exporters) is accepted and not used
    files           relative path -> {"sha256": 64 lowercase hex chars, "bytes": int >= 0};
                    every path named in functions.*.files must be listed here

Fixed-shape sub-objects (producer, limits, ...) also refuse unknown keys. Any deviation raises
ArtifactError naming the field; validation never raises anything else, whatever the JSON.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any

from runtime.format.compat import parse_version
from runtime.errors import ArtifactError
from runtime.format.integrity import check_member_name

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "mamba2-aot-artifact"
SCHEMA_VERSION = 2
SEMANTICS_VERSIONS = (1, 2)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's platform names (the exporter's choices too)
DTYPES = ("float32", "bfloat16")
REQUIRED_FUNCTIONS = ("prefill", "decode")
# Element types a function signature may use (numpy / jax dtype names).
TENSOR_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 bfloat16 float32 float64 complex64 complex128 int4 uint4 float8_e4m3fn float8_e5m2 "
    "key<fry> key<rbg> key<unsafe_rbg>".split()
)
_TOP_KEYS = (
    "format", "schema_version", "created", "producer", "serialization", "compatibility",
    "platforms", "dtype", "model", "tokens", "limits", "buckets", "functions", "weights",
    "mesh", "files",
)
_OPTIONAL_TOP_KEYS = frozenset({"mesh"})
_V2_TOP_KEYS = ("semantics_version", "memory")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PLAIN = re.compile(r"[A-Za-z0-9_.\-/\[\]']{1,80}")
_FIX = "re-export the artifact"


@dataclasses.dataclass(frozen=True)
class Producer:
    package: str
    version: str
    jax: str
    jaxlib: str


@dataclasses.dataclass(frozen=True)
class Serialization:
    jax_export_version: int
    calling_convention_version: int


@dataclasses.dataclass(frozen=True)
class Compatibility:
    jax_min: str
    jax_max_exclusive: str
    expires: str  # "YYYY-MM-DD"


@dataclasses.dataclass(frozen=True)
class Tokens:
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one artifact accepts. The exporter builds it (defaults are its defaults); a schema 1
    manifest's limits read as decode_block = max_new_tokens, max_prefill_tokens = max_batch x
    max_prompt_tokens, max_context = None."""

    max_batch: int = 64
    max_prompt_tokens: int = 1 << 20  # per request; longer prompts run as several prefill calls
    max_new_tokens: int = 1 << 16  # per request; decoded decode_block tokens per device call
    max_stop_tokens: int = 8
    decode_block: int = 256
    max_prefill_tokens: int = 8192  # batch x length of one prefill call (its memory)
    max_context: int | None = None  # tokens one sequence may hold (None: unbounded, an SSM state)
    vocab_size: int = 0  # the model's (an exporter's limits leave it 0: the manifest gets the model's)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Memory:
    prefill_activation_bytes: int


@dataclasses.dataclass(frozen=True)
class Buckets:
    prompt: tuple[int, ...]
    batch: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]  # platform -> relative path


@dataclasses.dataclass(frozen=True)
class Mesh:
    axis_names: tuple[str, ...]
    shape: tuple[int, ...]
    weight_shardings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest; `raw` is the JSON object it was parsed from."""

    format: str
    schema_version: int
    semantics_version: int
    created: str
    producer: Producer
    serialization: Serialization
    compatibility: Compatibility
    platforms: tuple[str, ...]
    dtype: str
    model: dict[str, Any]
    tokens: Tokens
    limits: Limits
    memory: Memory | None
    buckets: Buckets
    functions: dict[str, FunctionSpec]
    weights: dict[str, Any]
    mesh: Mesh | None
    files: dict[str, FileRecord]
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.files.values())


# ---------------------------------------------------------------- validation helpers


def _show(value: Any) -> str:
    """A short one-line description of a JSON value for error messages."""
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
    if isinstance(value, (dict, list)):
        return f"{kind} of {len(value)}"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. int too large to print
        text = "?"
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


def _fail(field: str, expected: str, value: Any) -> ArtifactError:
    return ArtifactError(f"manifest field {field} must be {expected}, got {_show(value)}: {_FIX}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, field: str, minimum: int | None = None) -> int:
    if not _is_int(v) or (minimum is not None and v < minimum):
        expected = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise _fail(field, expected, v)
    return v


def _str(v: Any, field: str) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(field, "a non-empty string", v)
    return v


def _list(v: Any, field: str, nonempty: bool = False) -> list:
    if not isinstance(v, list) or (nonempty and not v):
        raise _fail(field, "a non-empty list" if nonempty else "a list", v)
    return v


def _obj(v: Any, field: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _fail(field, "an object", v)
    return v


def _name(key: str) -> str:
    """A key as it may appear in a one-line message."""
    return key if _PLAIN.fullmatch(key) else repr(key)[:60]


def _keys(v: Any, field: str, keys: tuple[str, ...], optional: frozenset = frozenset()) -> dict:
    """`v` as an object with exactly `keys` (those in `optional` may be absent); field "" is the top level."""
    d = _obj(v, field or "manifest")
    prefix = f"{field}." if field else ""
    extra = sorted(set(d) - set(keys))
    if extra:
        names = ", ".join(prefix + _name(k) for k in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise ArtifactError(
            f"manifest carries fields from a newer format ({names}): upgrade mamba2-aot or {_FIX}"
        )
    missing = [k for k in keys if k not in d and k not in optional]
    if missing:
        raise ArtifactError(f"manifest is missing field {prefix}{missing[0]}: {_FIX}")
    return d


def _version(v: Any, field: str) -> str:
    s = _str(v, field)
    try:
        parse_version(s)
    except ValueError:
        raise _fail(field, "a version like '0.10.2'", v) from None
    return s


def _ascending(v: Any, field: str) -> tuple[int, ...]:
    items = tuple(_int(x, f"{field}[{i}]", 1) for i, x in enumerate(_list(v, field, nonempty=True)))
    if any(a >= b for a, b in zip(items, items[1:])):
        raise _fail(field, "strictly ascending", v)
    return items


# ---------------------------------------------------------------- sections


def _check_header(d: dict) -> int:
    """format and schema_version, checked first so that a newer manifest says so."""
    if "format" not in d:
        raise ArtifactError("manifest has no 'format' field: not a mamba2-aot artifact")
    if d["format"] != FORMAT_NAME:
        raise ArtifactError(f"manifest format is {_show(d['format'])}, not {FORMAT_NAME!r}: not a mamba2-aot artifact")
    if "schema_version" not in d:
        raise ArtifactError(f"manifest is missing field schema_version: {_FIX}")
    sv = d["schema_version"]
    if not _is_int(sv):
        raise _fail("schema_version", "an integer", sv)
    if sv > SCHEMA_VERSION:
        raise ArtifactError(
            f"written by a newer mamba2-aot (schema {sv}, this reads {SCHEMA_VERSION}): "
            "upgrade mamba2-aot or re-export"
        )
    if sv < 1:
        raise ArtifactError(f"manifest schema {sv} is no longer supported (this reads 1 and {SCHEMA_VERSION}): {_FIX}")
    return sv


def _created(v: Any) -> str:
    s = _str(v, "created")
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        raise _fail("created", "an ISO-8601 UTC timestamp", v) from None
    if t.utcoffset() != _dt.timedelta(0):
        raise _fail("created", "an ISO-8601 timestamp in UTC (ending in Z or +00:00)", v)
    return s


def _compatibility(v: Any) -> Compatibility:
    d = _keys(v, "compatibility", ("jax_min", "jax_max_exclusive", "expires"))
    lo = _version(d["jax_min"], "compatibility.jax_min")
    hi = _version(d["jax_max_exclusive"], "compatibility.jax_max_exclusive")
    if parse_version(lo) >= parse_version(hi):
        raise _fail("compatibility.jax_max_exclusive", f"above jax_min {lo}", hi)
    expires = _str(d["expires"], "compatibility.expires")
    try:
        if not _DATE.fullmatch(expires):
            raise ValueError
        _dt.date.fromisoformat(expires)
    except ValueError:
        raise _fail("compatibility.expires", "a date YYYY-MM-DD", expires) from None
    return Compatibility(lo, hi, expires)


def _platforms(v: Any) -> tuple[str, ...]:
    items = _list(v, "platforms", nonempty=True)
    for i, p in enumerate(items):
        if p not in PLATFORMS:
            raise _fail(f"platforms[{i}]", "one of " + ", ".join(PLATFORMS), p)
    if len(set(items)) != len(items):
        raise _fail("platforms", "a list without duplicates", v)
    return tuple(items)


def _tokens(v: Any, vocab_size: int) -> Tokens:
    d = _keys(v, "tokens", ("bos_id", "eos_id", "pad_id"))
    ids = {}
    for k in ("bos_id", "eos_id", "pad_id"):
        x = d[k]
        if x is not None and (not _is_int(x) or not 0 <= x < vocab_size):
            raise _fail(f"tokens.{k}", f"null or a token id in [0, {vocab_size})", x)
        ids[k] = x
    return Tokens(**ids)


_V1_LIMITS = ("max_batch", "max_prompt_tokens", "max_new_tokens", "max_stop_tokens", "vocab_size")
_V2_LIMITS = (*_V1_LIMITS, "decode_block", "max_prefill_tokens", "max_context")


def _limits(v: Any, schema: int) -> Limits:
    d = _keys(v, "limits", _V1_LIMITS if schema == 1 else _V2_LIMITS)
    ints = {k: _int(d[k], f"limits.{k}", 1) for k in _V1_LIMITS}
    if schema == 1:
        return Limits(**ints, decode_block=ints["max_new_tokens"],
                      max_prefill_tokens=ints["max_batch"] * ints["max_prompt_tokens"])
    context = d["max_context"]
    return Limits(**ints, decode_block=_int(d["decode_block"], "limits.decode_block", 1),
                  max_prefill_tokens=_int(d["max_prefill_tokens"], "limits.max_prefill_tokens", 1),
                  max_context=None if context is None else _int(context, "limits.max_context", 1))


def _memory(v: Any) -> Memory:
    d = _keys(v, "memory", ("prefill_activation_bytes",))
    return Memory(_int(d["prefill_activation_bytes"], "memory.prefill_activation_bytes", 0))


def _semantics(v: Any) -> int:
    if not _is_int(v):
        raise _fail("semantics_version", "an integer", v)
    if v not in SEMANTICS_VERSIONS:
        raise ArtifactError(f"artifact uses function semantics {v}; this mamba2-aot runs "
                            f"{', '.join(map(str, SEMANTICS_VERSIONS))}: upgrade mamba2-aot or re-export")
    return v


def _buckets(v: Any) -> Buckets:
    d = _keys(v, "buckets", ("prompt", "batch"))
    return Buckets(_ascending(d["prompt"], "buckets.prompt"), _ascending(d["batch"], "buckets.batch"))


def _tensors(v: Any, field: str) -> tuple[TensorSpec, ...]:
    out = []
    for i, t in enumerate(_list(v, field)):
        f = f"{field}[{i}]"
        d = _keys(t, f, ("name", "shape", "dtype"))
        shape = []
        for j, dim in enumerate(_list(d["shape"], f"{f}.shape")):
            if not (isinstance(dim, str) and dim) and not (_is_int(dim) and dim >= 0):
                raise _fail(f"{f}.shape[{j}]", "an integer >= 0 or a symbolic dimension name", dim)
            shape.append(dim)
        if not isinstance(d["dtype"], str) or d["dtype"] not in TENSOR_DTYPES:
            raise _fail(f"{f}.dtype", "a dtype name such as 'int32' or 'float32'", d["dtype"])
        out.append(TensorSpec(_str(d["name"], f"{f}.name"), tuple(shape), d["dtype"]))
    return tuple(out)


def _functions(v: Any, platforms: tuple[str, ...]) -> dict[str, FunctionSpec]:
    d = _obj(v, "functions")
    for name in REQUIRED_FUNCTIONS:
        if name not in d:
            raise ArtifactError(f"manifest is missing field functions.{name}: {_FIX}")
    out = {}
    for name, spec in d.items():
        field = f"functions.{_name(name)}"
        s = _keys(spec, field, ("inputs", "outputs", "files"))
        files = _obj(s["files"], f"{field}.files")
        for plat, rel in files.items():
            if plat not in platforms:
                raise _fail(f"{field}.files", "keyed by the manifest's platforms", plat)
            check_member_name(_str(rel, f"{field}.files.{plat}"))
        missing = [p for p in platforms if p not in files]
        if missing:
            raise ArtifactError(f"manifest field {field}.files has no file for platform {missing[0]}: {_FIX}")
        out[name] = FunctionSpec(
            _tensors(s["inputs"], f"{field}.inputs"), _tensors(s["outputs"], f"{field}.outputs"), dict(files)
        )
    return out


def _weights(v: Any) -> dict:
    d = _obj(v, "weights")
    if "tensors" not in d:
        raise ArtifactError(f"manifest is missing field weights.tensors: {_FIX}")
    _list(d["tensors"], "weights.tensors")
    return d


def _mesh(v: Any) -> Mesh | None:
    if v is None:
        return None
    d = _keys(v, "mesh", ("axis_names", "shape", "weight_shardings", "cache_shardings"), frozenset({"cache_shardings"}))
    if "cache_shardings" in d:
        _obj(d["cache_shardings"], "mesh.cache_shardings")
    names = tuple(_str(x, f"mesh.axis_names[{i}]") for i, x in enumerate(_list(d["axis_names"], "mesh.axis_names", True)))
    if len(set(names)) != len(names):
        raise _fail("mesh.axis_names", "a list without duplicates", d["axis_names"])
    shape = tuple(_int(x, f"mesh.shape[{i}]", 1) for i, x in enumerate(_list(d["shape"], "mesh.shape")))
    if len(shape) != len(names):
        raise _fail("mesh.shape", f"a list of {len(names)} sizes (one per axis name)", d["shape"])
    return Mesh(names, shape, _obj(d["weight_shardings"], "mesh.weight_shardings"))


def _files(v: Any) -> dict[str, FileRecord]:
    out = {}
    for rel, rec in _obj(v, "files").items():
        check_member_name(rel)
        field = f"files[{_name(rel)}]"
        r = _keys(rec, field, ("sha256", "bytes"))
        if not isinstance(r["sha256"], str) or not _SHA256.fullmatch(r["sha256"]):
            raise _fail(f"{field}.sha256", "64 lowercase hex digits", r["sha256"])
        out[rel] = FileRecord(r["sha256"], _int(r["bytes"], f"{field}.bytes", 0))
    return out


# ---------------------------------------------------------------- public API


def parse_manifest(obj: Any) -> Manifest:
    """Validate a decoded manifest object; raises ArtifactError (only) on any problem."""
    try:
        return _parse(obj)
    except ArtifactError:
        raise
    except (RecursionError, MemoryError) as e:  # absurdly nested or huge values
        raise ArtifactError(f"manifest is too large or deeply nested ({type(e).__name__}): {_FIX}") from None


def _parse(obj: Any) -> Manifest:
    if not isinstance(obj, dict):
        raise ArtifactError(f"manifest is not a JSON object (got {_show(obj)}): not a mamba2-aot artifact")
    sv = _check_header(obj)
    d = _keys(obj, "", _TOP_KEYS if sv == 1 else (*_TOP_KEYS, *_V2_TOP_KEYS), _OPTIONAL_TOP_KEYS)
    producer = _keys(d["producer"], "producer", ("package", "version", "jax", "jaxlib"))
    serialization = _keys(d["serialization"], "serialization", ("jax_export_version", "calling_convention_version"))
    platforms = _platforms(d["platforms"])
    if d["dtype"] not in DTYPES:
        raise _fail("dtype", " or ".join(repr(x) for x in DTYPES), d["dtype"])
    limits = _limits(d["limits"], sv)
    functions = _functions(d["functions"], platforms)
    files = _files(d["files"])
    for name, fn in functions.items():
        for plat, rel in fn.files.items():
            if rel not in files:
                raise ArtifactError(f"manifest field functions.{_name(name)}.files.{plat} names {_name(rel)}, which is not listed in files: {_FIX}")
    return Manifest(
        format=FORMAT_NAME,
        schema_version=sv,
        semantics_version=1 if sv == 1 else _semantics(d["semantics_version"]),
        created=_created(d["created"]),
        producer=Producer(**{k: _str(producer[k], f"producer.{k}") for k in ("package", "version", "jax", "jaxlib")}),
        serialization=Serialization(
            _int(serialization["jax_export_version"], "serialization.jax_export_version", 0),
            _int(serialization["calling_convention_version"], "serialization.calling_convention_version", 0),
        ),
        compatibility=_compatibility(d["compatibility"]),
        platforms=platforms,
        dtype=d["dtype"],
        model=_obj(d["model"], "model"),
        tokens=_tokens(d["tokens"], limits.vocab_size),
        limits=limits,
        memory=None if sv == 1 else _memory(d["memory"]),
        buckets=_buckets(d["buckets"]),
        functions=functions,
        weights=_weights(d["weights"]),
        mesh=_mesh(d.get("mesh")),
        files=files,
        raw=obj,
    )


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def decode_manifest(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate the bytes of a manifest.json."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{where} is not UTF-8 text: not a mamba2-aot artifact, or corrupt") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{where} is not valid JSON ({msg}): not a mamba2-aot artifact, or corrupt") from None
    try:
        return parse_manifest(obj)
    except ArtifactError as e:
        raise ArtifactError(f"{where}: {e}") from None


def read_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """Read and validate `<artifact_dir>/manifest.json`."""
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    try:
        if not root.exists():
            raise ArtifactError(f"no artifact directory at {root}")
        if not root.is_dir():
            raise ArtifactError(f"{root} is not a directory: pass an artifact directory")
        if not path.exists():
            raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not a mamba2-aot artifact")
        data = path.read_bytes()
    except (OSError, ValueError) as e:  # permissions, name too long, NUL in the name
        reason = getattr(e, "strerror", None) or e
        raise ArtifactError(f"cannot read {path}: {reason}") from None
    return decode_manifest(data, str(path))


def encode_manifest(obj: dict) -> bytes:
    """Validate `obj` and return the manifest.json bytes (indent=2, standard JSON)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"manifest cannot be written as JSON ({e})") from None
    # Validate what a reader will see (tuples become lists, keys become strings).
    decode_manifest(text.encode("utf-8"), "manifest")
    return text.encode("utf-8") + b"\n"
