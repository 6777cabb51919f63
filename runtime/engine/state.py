"""The recurrent state as a value: one sequence's snapshot (`State`) and batches of them.

The runtime knows the state only through the manifest (semantics version 2): the `state/...`
inputs of `prefill` name its leaves, and each leaf's shape has one dimension named `b`, the
batch. A fresh sequence is all zeros. That is enough to build fresh batches, take one row out
of a batch, put rows together into a batch, and scatter rows into slots, for any model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime.errors import ArtifactError, RequestError

PREFIX = "state/"


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # keys below "state/" in the nested dict
    shape: tuple  # ints and the symbol "b"
    dtype: np.dtype
    axis: int  # the batch dimension

    def shape_for(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "b" else d for d in self.shape)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape_for(1)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The state's leaves (manifest order), read from the prefill function's signature."""

    leaves: tuple[Leaf, ...]

    @classmethod
    def from_function(cls, spec) -> "StateLayout":
        """`spec`: the manifest's FunctionSpec of a function that takes the state."""
        import ml_dtypes  # noqa: F401  (bfloat16 & co. as numpy dtypes)

        leaves = []
        for t in spec.inputs:
            if not t.name.startswith(PREFIX):
                continue
            if t.shape.count("b") != 1:
                raise ArtifactError(f"state input {t.name} must have exactly one batch dimension 'b', "
                                    f"has shape {list(t.shape)}: re-export the artifact")
            leaves.append(Leaf(tuple(t.name[len(PREFIX):].split("/")), tuple(t.shape), np.dtype(t.dtype),
                               t.shape.index("b")))
        if not leaves:
            raise ArtifactError("the artifact's prefill takes no state: re-export it with this mamba2-aot")
        return cls(tuple(leaves))

    @property
    def bytes_per_sequence(self) -> int:
        return sum(leaf.row_bytes for leaf in self.leaves)

    def nest(self, arrays: Sequence) -> dict:
        """Leaves (layout order) -> the nested dict the functions take."""
        out: dict = {}
        for leaf, a in zip(self.leaves, arrays):
            node = out
            for k in leaf.path[:-1]:
                node = node.setdefault(k, {})
            node[leaf.path[-1]] = a
        return out

    def flat(self, state: Mapping) -> list:
        """The nested dict -> its leaves in layout order."""
        out = []
        for leaf in self.leaves:
            node = state
            for k in leaf.path:
                node = node[k]
            out.append(node)
        return out

    def zeros(self, batch: int) -> dict:
        """A batch of fresh sequences, on the device."""
        import jax.numpy as jnp

        return self.nest([jnp.zeros(leaf.shape_for(batch), leaf.dtype) for leaf in self.leaves])

    def take(self, state: Mapping, row: int) -> list:
        """Row `row` of a batch, as leaves with a batch dimension of 1 (device copies; one
        compiled program per leaf shape, whatever the row)."""
        return [take_row(a, row, leaf.axis) for leaf, a in zip(self.leaves, self.flat(state))]

    def stack(self, rows: Sequence[Sequence | None], batch: int) -> dict:
        """A batch from per-row leaves (None: a fresh row), padded with fresh rows to `batch`."""
        import jax.numpy as jnp

        if all(r is None for r in rows):
            return self.zeros(batch)
        out = []
        for j, leaf in enumerate(self.leaves):
            zero = jnp.zeros(leaf.shape_for(1), leaf.dtype)
            parts = [zero if r is None else r[j] for r in rows] + [zero] * (batch - len(rows))
            out.append(jnp.concatenate(parts, axis=leaf.axis))
        return self.nest(out)


    def put(self, slots: Mapping, rows: Mapping, dest: Sequence[int]) -> dict:
        """`slots` with row j of `rows` written into slot dest[j], for j < len(dest) (the slots'
        buffers are donated: updated in place where XLA can; do not use `slots` afterwards)."""
        import jax.numpy as jnp

        dest = jnp.asarray(np.asarray(dest, np.int32))
        out = [_put(a, r, dest, leaf.axis) for leaf, a, r in zip(self.leaves, self.flat(slots), self.flat(rows))]
        return self.nest(out)


def take_row(a, row: int, axis: int = 0):
    """Row `row` of `a` along `axis`, keeping the axis (size 1); the row is a traced index."""
    global _TAKE
    if _TAKE is None:
        import functools

        import jax

        @functools.partial(jax.jit, static_argnums=2)
        def take(a, row, axis):
            return jax.lax.dynamic_slice_in_dim(a, row, 1, axis=axis)

        _TAKE = take
    return _TAKE(a, np.int32(row), axis)


_TAKE = None


def _put(slots, rows, dest, axis: int):
    """slots with rows[..., j, ...] (along `axis`) at index dest[j]; jitted per shape, donated."""
    global _PUT
    if _PUT is None:
        import functools

        import jax

        @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
        def put(slots, rows, dest, axis):
            rows = jax.lax.slice_in_dim(rows, 0, dest.shape[0], axis=axis)
            index = (slice(None),) * axis + (dest,)
            return slots.at[index].set(rows)

        _PUT = put
    return _PUT(slots, rows, dest, axis)


_PUT = None


@dataclasses.dataclass(frozen=True, eq=False)
class State:
    """One sequence's state after `num_tokens` tokens: a value, cheap to keep (a few MB).

    Start a call from it (`generate(..., states=[s])`), keep it, or drop it; its arrays are
    immutable device arrays, so copies share them. `logits` are the next-token logits, so a
    call may continue from a state with no new prompt tokens. `tokens` is the token history
    when known (the prefix cache keys on it). `artifact` identifies the artifact that made it:
    another artifact refuses it.
    """

    leaves: tuple  # device arrays, each with a batch dimension of 1
    logits: object  # [1, V] float32 device array
    num_tokens: int
    artifact: str
    tokens: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.leaves) + int(self.logits.nbytes)

    def copy(self) -> "State":
        """An independent handle (the arrays are immutable, so they are shared, not copied)."""
        return dataclasses.replace(self)

    def save(self, path: str | Path) -> Path:
        """Write the state to a .safetensors file (load with `LoadedModel.load_state`)."""
        from safetensors.numpy import save_file

        arrays = {f"leaf{i}": np.asarray(a) for i, a in enumerate(self.leaves)}
        arrays["logits"] = np.asarray(self.logits)
        meta = {"format": "mamba2-aot-state", "artifact": self.artifact, "num_tokens": str(self.num_tokens)}
        if self.tokens is not None:
            arrays["tokens"] = np.asarray(self.tokens, np.int64)
        path = Path(path)
        try:
            save_file(arrays, str(path), metadata=meta)
        except OSError as e:
            raise RequestError(f"cannot write the state to {path}: {e.strerror or e}") from e
        return path


def read_state_file(path: str | Path, artifact: str, layout: StateLayout) -> State:
    """A State saved by `State.save`, checked against this artifact's identity and layout."""
    import jax.numpy as jnp
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise RequestError(f"cannot read a state from {path}: {e}") from e
    if meta.get("format") != "mamba2-aot-state":
        raise RequestError(f"{path} is not a saved mamba2-aot state")
    if meta.get("artifact") != artifact:
        raise RequestError(f"the state in {path} was made by another artifact: states only continue "
                           "on the artifact (and platform) that made them")
    leaves = []
    for i, leaf in enumerate(layout.leaves):
        a = arrays.get(f"leaf{i}")
        if a is None or a.shape != leaf.shape_for(1) or a.dtype != leaf.dtype:
            raise RequestError(f"the state in {path} does not match this artifact's state layout")
        leaves.append(jnp.asarray(a))
    tokens = tuple(int(t) for t in arrays["tokens"]) if "tokens" in arrays else None
    return State(tuple(leaves), jnp.asarray(arrays["logits"]), int(meta.get("num_tokens", 0)), artifact, tokens)
