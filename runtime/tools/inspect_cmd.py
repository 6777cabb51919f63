"""`mamba2-aot inspect ARTIFACT`: what an artifact holds and where it can run (manifest only)."""

from __future__ import annotations

import json
from typing import Any

import click

from runtime.environment import fmt_bytes
from runtime.format.compat import expiry_warning, in_jax_window, jax_version
from runtime.errors import Mamba2AOTError
from runtime.format.manifest import Manifest, TensorSpec, read_manifest

_MAX_MODEL_ROWS = 40


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _flatten(obj: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted (key, value) rows of the scalar (or short scalar list) entries of a JSON object."""
    rows = []
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _flatten(v, key + ".")
        elif _scalar(v) or (isinstance(v, list) and len(v) <= 8 and all(map(_scalar, v))):
            rows.append((key, v))
    return rows


def _model_name(model: dict) -> str:
    for source in (model, model.get("config")):
        if isinstance(source, dict) and isinstance(source.get("name"), str):
            return source["name"]
    return "(unnamed)"


def _fmt(t: TensorSpec) -> str:
    return f"{t.name}: {t.dtype}[{', '.join(str(d) for d in t.shape)}]"


def _args(tensors: tuple[TensorSpec, ...], collapse: int = 0) -> str:
    """Comma-separated tensors; groups sharing a 'prefix/' larger than `collapse` become one entry."""
    groups: dict[str, list[TensorSpec]] = {}
    for t in tensors:
        groups.setdefault(t.name.split("/", 1)[0] if "/" in t.name else t.name, []).append(t)
    parts = []
    for prefix, ts in groups.items():
        if collapse and len(ts) > collapse:
            dtypes = "/".join(sorted({t.dtype for t in ts}))
            parts.append(f"{prefix}: {len(ts)} {dtypes} tensors")
        else:
            parts.extend(map(_fmt, ts))
    return "(" + ", ".join(parts) + ")"


def _signature(name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> str:
    return f"{name}{_args(inputs)} -> {_args(outputs)}"


def _memory(m: Manifest) -> dict[str, Any] | None:
    """What a sequence's state costs and what the largest call can allocate (semantics 2)."""
    if m.semantics_version < 2:
        return None
    from runtime.engine.state import StateLayout

    per_sequence = StateLayout.from_function(m.functions["prefill"]).bytes_per_sequence
    lim = m.limits
    return {
        "state_bytes_per_sequence": per_sequence,
        "state_bytes_at_max_batch": per_sequence * lim.max_batch,
        "prefill_activation_bytes": m.memory.prefill_activation_bytes,
        # Weights aside, no accepted request allocates more than this: the largest prefill call's
        # temporaries (prompts are prefilled in segments of at most max_prefill_tokens) plus one
        # batch of state in and out.
        "request_bound_bytes": m.memory.prefill_activation_bytes + 2 * per_sequence * lim.max_batch,
    }


def describe(artifact_dir: str) -> dict[str, Any]:
    """The inspect report as a JSON-ready dict (reads only the manifest)."""
    m: Manifest = read_manifest(artifact_dir)
    try:
        current = jax_version()
    except Mamba2AOTError:
        current = None
    c = m.compatibility
    return {
        "artifact": str(artifact_dir),
        "model_name": _model_name(m.model),
        "model": m.model,
        "dtype": m.dtype,
        "platforms": list(m.platforms),
        "producer": m.raw["producer"],
        "created": m.created,
        "serialization": m.raw["serialization"],
        "compatibility": {
            "jax_min": c.jax_min,
            "jax_max_exclusive": c.jax_max_exclusive,
            "expires": c.expires,
            "current_jax": current,
            "current_jax_supported": None if current is None else in_jax_window(m, current),
            "expiry_warning": expiry_warning(m),
        },
        "semantics_version": m.semantics_version,
        "tokens": m.raw["tokens"],
        "limits": m.raw["limits"],
        "memory": _memory(m),
        "buckets": m.raw["buckets"],
        "mesh": None if m.mesh is None else {"axis_names": list(m.mesh.axis_names), "shape": list(m.mesh.shape)},
        "functions": {
            name: {
                "signature": _signature(name, fn.inputs, fn.outputs),
                "inputs": m.raw["functions"][name]["inputs"],
                "outputs": m.raw["functions"][name]["outputs"],
                "files": fn.files,
            }
            for name, fn in m.functions.items()
        },
        "files": {rel: {"bytes": r.bytes, "sha256": r.sha256} for rel, r in m.files.items()},
        "total_bytes": m.total_bytes,
    }


def _memory_rows(mem: dict | None) -> list[tuple[str, str]]:
    if mem is None:
        return []
    return [("memory", ""),
            ("  state", f"{fmt_bytes(mem['state_bytes_per_sequence'])} per sequence whatever its length, "
                        f"{fmt_bytes(mem['state_bytes_at_max_batch'])} at max_batch"),
            ("  prefill", f"at most {fmt_bytes(mem['prefill_activation_bytes'])} of temporaries per call"),
            ("  bound", f"no request allocates more than {fmt_bytes(mem['request_bound_bytes'])} beyond the weights")]


def _kv(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def render(info: dict[str, Any]) -> str:
    """The inspect report as an aligned two-column table."""
    rows: list[tuple[str, str]] = [("artifact", info["artifact"]), ("model", info["model_name"])]
    config = [(k, v) for k, v in _flatten(info["model"]) if k not in ("name", "config.name")]
    for k, v in config[:_MAX_MODEL_ROWS]:
        rows.append((f"  {k}", json.dumps(v)))
    if len(config) > _MAX_MODEL_ROWS:
        rows.append(("  ...", f"{len(config) - _MAX_MODEL_ROWS} more (see --json)"))
    p, c = info["producer"], info["compatibility"]
    if c["current_jax"] is None:
        here = "jax is not installed here"
    else:
        here = f"this is jax {c['current_jax']}: " + ("supported" if c["current_jax_supported"] else "NOT supported")
    rows += [
        ("dtype", info["dtype"]),
        ("platforms", ", ".join(info["platforms"])),
        ("producer", f"{p['package']} {p['version']} (jax {p['jax']}, jaxlib {p['jaxlib']})"),
        ("exported", info["created"]),
        ("serialization", f"jax.export version {info['serialization']['jax_export_version']}, "
                          f"calling convention {info['serialization']['calling_convention_version']}"),
        ("compatible with", f"jax [{c['jax_min']}, {c['jax_max_exclusive']}); {here}"),
        ("expires", c["expires"] + (f" ({c['expiry_warning']})" if c["expiry_warning"] else "")),
        ("semantics", f"version {info['semantics_version']}" + (
            ": prefill continues from a state; per-row decode controls" if info["semantics_version"] >= 2
            else ": prefill starts fresh; one set of decode controls per batch")),
        ("tokens", _kv(info["tokens"])),
        ("limits", _kv(info["limits"])),
        ("buckets", f"prompt {info['buckets']['prompt']}, batch {info['buckets']['batch']}"),
        *_memory_rows(info["memory"]),
        ("mesh", "none" if info["mesh"] is None else
         " x ".join(f"{n}={s}" for n, s in zip(info["mesh"]["axis_names"], info["mesh"]["shape"]))),
        ("functions", ""),
    ]
    for name, fn in info["functions"].items():
        spec = {k: tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in fn[k])
                for k in ("inputs", "outputs")}
        rows.append((f"  {name}", _args(spec["inputs"], collapse=4)))
        rows.append(("", "-> " + _args(spec["outputs"], collapse=4)))
        rows.append(("", "files: " + ", ".join(f"{plat} {rel}" for plat, rel in fn["files"].items())))
    rows.append(("files", ""))
    for rel, rec in info["files"].items():
        rows.append((f"  {rel}", fmt_bytes(rec["bytes"])))
    rows.append(("  total", f"{fmt_bytes(info['total_bytes'])} in {len(info['files'])} files"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}".rstrip() for k, v in rows)


@click.command("inspect")
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect_command(artifact: str, as_json: bool) -> None:
    """Show what ARTIFACT contains and where it runs (reads only its manifest)."""
    info = describe(artifact)
    click.echo(json.dumps(info, indent=2, ensure_ascii=False) if as_json else render(info))
