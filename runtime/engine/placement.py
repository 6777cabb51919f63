"""Multi-device placement of an artifact: mesh and shardings from the manifest, nothing else.

An artifact exported with `--devices N` records `mesh` in its manifest: axis names, shape,
and a PartitionSpec per weight and per cache array (JSON lists: `["model", null]`; an entry
may also be a list of axis names). This module turns that record into a concrete
`jax.sharding.Mesh` over this process's devices and `NamedSharding`s, refuses a device count
that does not match, places weights (an orbax checkpoint is restored straight into its
shards; other sources are read on the host and then placed), and wraps each deserialized
function in a `jax.jit` with the shardings stored in the module. It knows nothing about the
model: only names, ranks and PartitionSpecs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from runtime.errors import ArtifactError, CompatibilityError, WeightsError

_FIX = "re-export the artifact"


def _spec_entry(v: Any, axes: tuple[str, ...], where: str):
    """One PartitionSpec entry: null, an axis name, or a list of axis names."""
    if v is None:
        return None
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names or not all(isinstance(a, str) for a in names):
        raise ArtifactError(f"manifest field {where} must be null, an axis name or a list of axis names, "
                            f"got {v!r:.60}: {_FIX}")
    unknown = [a for a in names if a not in axes]
    if unknown:
        raise ArtifactError(f"manifest field {where} names mesh axis {unknown[0]!r:.40}, not one of "
                            f"{list(axes)}: {_FIX}")
    return names[0] if isinstance(v, str) else tuple(names)


def parse_spec(v: Any, axes: tuple[str, ...], where: str, rank: int | None = None) -> tuple:
    """A manifest PartitionSpec (JSON list) as a tuple for `jax.sharding.PartitionSpec(*spec)`."""
    if not isinstance(v, list):
        raise ArtifactError(f"manifest field {where} must be a list (one entry per dimension), got {v!r:.60}: {_FIX}")
    if rank is not None and len(v) > rank:
        raise ArtifactError(f"manifest field {where} has {len(v)} entries for a tensor of rank {rank}: {_FIX}")
    spec = tuple(_spec_entry(x, axes, f"{where}[{i}]") for i, x in enumerate(v))
    used = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    if len(set(used)) != len(used):
        raise ArtifactError(f"manifest field {where} uses a mesh axis twice: {_FIX}")
    return spec


def describe_mesh(mesh) -> str:
    """`model=4` / `data=2, model=4`, as the manifest's mesh reads."""
    return ", ".join(f"{a}={n}" for a, n in zip(mesh.axis_names, mesh.shape))


def check_device_count(mesh, available: int | None = None) -> int:
    """The mesh's device count; CompatibilityError unless this process sees exactly that many."""
    import jax

    need = math.prod(mesh.shape)
    have = jax.device_count() if available is None else available
    if have != need:
        raise CompatibilityError(
            f"artifact was exported for {need} devices (mesh {describe_mesh(mesh)}) but this process "
            f"sees {have}: run with {need} devices or re-export with --devices {have}")
    return need


class Placement:
    """A concrete mesh plus a NamedSharding per weight, from the manifest's `mesh` record."""

    def __init__(self, mesh_record, weight_spec):
        """`mesh_record`: runtime.format.manifest.Mesh; `weight_spec`: runtime.format.weightspec.WeightSpec.
        Raises CompatibilityError on a device-count mismatch, ArtifactError on a bad record."""
        import jax
        from jax.sharding import AxisType, NamedSharding, PartitionSpec

        self.record = mesh_record
        self.axis_names = tuple(mesh_record.axis_names)
        self.shape = tuple(mesh_record.shape)
        check_device_count(mesh_record)
        ranks = {t.name: len(t.shape) for t in weight_spec.tensors}
        unknown = sorted(set(mesh_record.weight_shardings) - set(ranks))
        if unknown:
            raise ArtifactError(f"manifest field mesh.weight_shardings names {len(unknown)} tensors that are "
                                f"not in weights.tensors ({', '.join(unknown[:3])}): {_FIX}")
        self.specs = {
            name: parse_spec(mesh_record.weight_shardings.get(name, []), self.axis_names,
                             f"mesh.weight_shardings[{name}]", ranks[name])
            for name in ranks
        }
        shape_of = {t.name: t.shape for t in weight_spec.tensors}
        for name, spec in self.specs.items():
            for dim, entry in enumerate(spec):
                if entry is None:
                    continue
                parts = math.prod(self.shape[self.axis_names.index(a)]
                                  for a in ((entry,) if isinstance(entry, str) else entry))
                if shape_of[name][dim] % parts:
                    raise ArtifactError(f"manifest field mesh.weight_shardings[{name}] splits dim {dim} "
                                        f"({shape_of[name][dim]}) into {parts} parts, which does not divide it: {_FIX}")
        # Auto axes: the module's shardings are GSPMD annotations (Explicit axes would re-type them).
        self.mesh = jax.make_mesh(self.shape, self.axis_names,
                                  axis_types=(AxisType.Auto,) * len(self.axis_names))
        self.weight_shardings = {n: NamedSharding(self.mesh, PartitionSpec(*s)) for n, s in self.specs.items()}

    @property
    def devices(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"Placement(mesh {describe_mesh(self)})"

    # -- functions ---------------------------------------------------------------------------
    def jit(self, exported) -> Callable:
        """`exported.call` under jit with the module's own in/out shardings over this mesh.

        Host inputs (numpy arrays and scalars) become global arrays with their input sharding
        (make_array_from_callback: also right when the mesh spans several hosts); device arrays
        must already carry their sharding (the previous call's outputs and the weights do)."""
        import jax

        if exported.nr_devices != self.devices:
            raise ArtifactError(f"function {exported.fun_name} was lowered for {exported.nr_devices} devices "
                                f"but the manifest's mesh has {self.devices}: {_FIX}")
        ins = exported.in_shardings_jax(self.mesh)
        outs = jax.tree.unflatten(exported.out_tree, exported.out_shardings_jax(self.mesh))
        fn = jax.jit(exported.call, in_shardings=jax.tree.unflatten(exported.in_tree, ins)[0],
                     out_shardings=outs)
        in_tree = exported.in_tree

        def call(*args):
            leaves, tree = jax.tree.flatten((args, {}))
            if tree != in_tree:
                raise TypeError(f"{exported.fun_name} takes {in_tree}, got {tree}")
            leaves = [x if isinstance(x, jax.Array) else _global(x, s) for x, s in zip(leaves, ins)]
            args, _ = jax.tree.unflatten(tree, leaves)
            return fn(*args)

        return call

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, path, spec, *, check_finite: bool = True) -> dict:
        """{name: array}: restored sharded from an orbax checkpoint, else read on the host
        (runtime.engine.weights.load_weights) for `place` to put on the devices."""
        from runtime.engine.checkpoints import OrbaxCheckpoint, open_checkpoint
        from runtime.engine.weights import load_weights

        with open_checkpoint(path) as ckpt:
            if isinstance(ckpt, OrbaxCheckpoint):
                return self._restore_orbax(ckpt, spec, check_finite)
        return load_weights(path, spec, check_finite=check_finite)

    def place(self, arrays: Mapping[str, Any]) -> dict:
        """Every weight on the mesh with its sharding (arrays already there are left as they are)."""
        from runtime.engine.weights import to_device

        missing = sorted(set(self.weight_shardings) - set(arrays))
        if missing:
            raise WeightsError(f"no value for {len(missing)} weights ({', '.join(missing[:3])})")
        return to_device(arrays, self.weight_shardings)

    def _restore_orbax(self, ckpt, spec, check_finite: bool) -> dict:
        """Each tensor read straight into its shards (each host reads only what it holds)."""
        import jax
        import jax.numpy as jnp

        from runtime.engine.weights import check_config, nonfinite_error, plan_load, source_label

        check_config(ckpt.config, spec, source=ckpt.path)
        plan = plan_load(ckpt, spec)  # metadata only; names, shapes, float dtypes checked
        out = ckpt.restore([plan[t.name] for t in spec.tensors],
                           shardings={plan[t.name]: self.weight_shardings[t.name] for t in spec.tensors},
                           dtypes={plan[t.name]: t.dtype for t in spec.tensors})
        result = {t.name: out[plan[t.name]] for t in spec.tensors}
        if check_finite:
            count = jax.jit(lambda d: {k: (jnp.sum(jnp.isnan(v)), jnp.sum(jnp.isinf(v))) for k, v in d.items()})
            counts = count(result)  # {name: (NaN count, Inf count)}, each on the devices holding it
            error = nonfinite_error(ckpt.path, {source_label(plan[t.name], t): tuple(map(int, counts[t.name]))
                                                for t in spec.tensors})
            if error is not None:
                raise error
        return result


def _global(x, sharding):
    """A host value as a global array with `sharding` (each process supplies its own shards)."""
    import jax

    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: np.asarray(arr[idx]))


def from_manifest(manifest, weight_spec) -> Placement | None:
    """None for a single-device artifact (no `mesh`), else its Placement (checks device count)."""
    if manifest.mesh is None:
        return None
    return Placement(manifest.mesh, weight_spec)


__all__ = ["Placement", "from_manifest", "check_device_count", "parse_spec", "describe_mesh"]
