"""Shared pieces of the hybrid tests: a jitted runner over a live HybridLM, prompts, and the
`hybrid_case` fixture (tiny seeded HF checkpoints loaded into our model, built once per process).
Torch is imported only when a case is built."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from exporter import blocks
from exporter.hybrid import HybridLM, state_shapes
from exporter.hybrid_config import HybridConfig
from exporter.hybrid_params import load_hybrid

LOGITS_RTOL = 1e-4  # max |ours - HF| / max |HF|
CAPACITY = 160  # KV slots: with KV_BLOCK = 32, five key blocks (attention's blockwise online softmax)
LENGTHS = [17, 40, 5]  # one ragged batch, right-padded to PAD_T
PAD_T = 48


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(2000 + seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def right_pad(rows, t: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, np.asarray([len(r) for r in rows], np.int32)


def row_of(a, key: str, i: int):
    """Row i of a state leaf (batch: axis 0 of every leaf)."""
    return a[i]


class HybridRunner:
    """Jitted prefill / step / forward of one live HybridLM, traced with `kv_block` keys per
    attention block (small, so tiny contexts still span several blocks)."""

    def __init__(self, model: HybridLM, fast_jit, capacity: int = CAPACITY, kv_block: int = 32):
        self.model, self.capacity, self.kv_block = model, capacity, kv_block
        graphdef, self.params = nnx.split(model)
        self._prefill = fast_jit(lambda p, s, tok, n: nnx.merge(graphdef, p).prefill(s, tok, n))

        def step(p, tok, state, active):
            m = nnx.merge(graphdef, p)
            logits, carry = m.step(tok, m.loop_carry(state), active)
            return logits, m.state_dict(carry)

        self._step = fast_jit(step)
        self._forward = fast_jit(lambda p, t: nnx.merge(graphdef, p).forward(t))

    def empty(self, batch: int) -> dict:
        return {k: jnp.zeros(s.shape, s.dtype)
                for k, s in state_shapes(self.model.cfg, batch, self.model.dtype, self.capacity).items()}

    def _tracing(self):
        """KV_BLOCK as this runner traces with (jit traces on a call's first new shape)."""
        return mock.patch.object(blocks, "KV_BLOCK", self.kv_block) if self.kv_block else contextlib.nullcontext()

    def prefill(self, state, tokens, lengths):
        with self._tracing():
            return self._prefill(self.params, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32))

    def step(self, tokens, state, active=None):
        active = jnp.ones(len(tokens), bool) if active is None else jnp.asarray(active)
        with self._tracing():
            return self._step(self.params, jnp.asarray(tokens, jnp.int32), state, active)

    def forward(self, tokens):
        with self._tracing():
            return self._forward(self.params, jnp.asarray(tokens, jnp.int32))

    def greedy(self, logits, state, n: int):
        """n greedy tokens per row from prefill's logits: (tokens [b, n], logits [b, n, V], state)."""
        toks, all_logits = [], []
        for i in range(n):
            all_logits.append(np.asarray(logits))
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            toks.append(np.asarray(nxt))
            if i + 1 < n:
                logits, state = self.step(nxt, state)
        return np.stack(toks, 1), np.stack(all_logits, 1), state


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    hf: object  # the transformers model (fp32, eval)
    cfg: HybridConfig
    runner: HybridRunner


_BUILT: dict[str, Case] = {}


@pytest.fixture(scope="session")
def hybrid_case(tmp_path_factory, fast_jit):
    """`hybrid_case(name, seed=0, **hf_config_overrides)` -> Case (hybrid_reference.TINY[name])."""

    def make(name: str, seed: int = 0, **overrides) -> Case:
        key = f"{name}/{seed}/{sorted(overrides.items())!r}"
        if key not in _BUILT:
            import hybrid_reference as ref

            hf = ref.make_hf_model(name, seed=seed, **overrides)
            path = ref.save_checkpoint(hf, tmp_path_factory.mktemp(f"hf-{name}"))
            cfg, model = load_hybrid(str(path))
            _BUILT[key] = Case(name, path, hf, cfg, HybridRunner(model, fast_jit))
        return _BUILT[key]

    return make
