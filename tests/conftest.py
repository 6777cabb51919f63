"""Shared fixtures: tiny HF reference checkpoints, random params, and jitted model runners.

Everything heavy is session-scoped and built lazily: torch/transformers are imported only by
the fixtures that need the PyTorch reference (through `hf_reference`), so test files that only
use `random_params` or `jax_runner` never import torch.
"""

from __future__ import annotations

import os
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from exporter.config import Mamba2Config
from exporter.model import Mamba2LM
from exporter.params import bind, param_shapes
from exporter.state import empty_state


# ---------------------------------------------------------------------------------------------
# Random parameters (no torch): {HF name: array} for any config.


def random_params(cfg: Mamba2Config, seed: int = 0, std: float = 0.2, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Seeded random params, spread like `hf_reference.make_hf_model` (clear logit margins)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in param_shapes(cfg, dtype).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            v = np.log(rng.uniform(1.0, 16.0, s.shape))
        elif leaf == "dt_bias":
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(0.1), s.shape))
            v = dt + np.log(-np.expm1(-dt))  # softplus^-1
        elif leaf == "D":
            v = rng.uniform(0.5, 1.5, s.shape)
        elif "norm" in name and leaf == "weight":
            v = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif "conv1d" in name and leaf == "weight":
            v = rng.uniform(-0.5, 0.5, s.shape)
        elif leaf == "bias":
            v = 0.1 * rng.standard_normal(s.shape)
        else:
            v = std * rng.standard_normal(s.shape)
        out[name] = jnp.asarray(v, dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Jitted runners over a live model.


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


class JaxRunner:
    """Jitted prefill / step / forward of one model (its params are traced arguments, so
    models of the same config and dtype share compilations)."""

    def __init__(self, model: Mamba2LM):
        self.model = model
        self.cfg: Mamba2Config = model.cfg
        self.dtype = model.dtype
        graphdef, self.state = nnx.split(model)
        self._prefill = _jitted(graphdef, "prefill")
        self._step = _jitted(graphdef, "step")
        self._forward = _jitted(graphdef, "forward")

    def prefill(self, tokens, lengths=None, state=None) -> tuple[jax.Array, dict]:
        """(logits [b, V], state): from `state` (default: fresh rows) over the tokens."""
        tokens = jnp.asarray(np.atleast_2d(np.asarray(tokens)), jnp.int32)
        if lengths is None:
            lengths = np.full((tokens.shape[0],), tokens.shape[1])
        if state is None:
            state = self.empty_state(tokens.shape[0])
        return self._prefill(self.state, state, tokens, jnp.asarray(lengths, jnp.int32))

    def step(self, tokens, state: dict, active=None) -> tuple[jax.Array, dict]:
        """One decode step over a state dict (every row active unless `active` says otherwise)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
        return self._step(self.state, tokens, state, active)

    def forward(self, tokens):
        tokens = jnp.asarray(np.atleast_2d(np.asarray(tokens)), jnp.int32)
        return self._forward(self.state, tokens)

    def empty_state(self, batch: int) -> dict:
        return empty_state(self.cfg, batch, self.dtype)

    def greedy(self, prompt, max_new_tokens: int) -> tuple[list[int], np.ndarray]:
        """prefill, then argmax + step: (new tokens, the logits each was chosen from [n, V])."""
        logits, cache = self.prefill(prompt)
        tokens, all_logits = [], []
        for i in range(max_new_tokens):
            all_logits.append(_np(logits[0]))
            nxt = jnp.argmax(logits, axis=-1)
            tokens.append(int(nxt[0]))
            if i + 1 < max_new_tokens:
                logits, cache = self.step(nxt, cache)
        return tokens, np.stack(all_logits)

    def teacher_forced(self, prompt, continuation) -> np.ndarray:
        """Logits [len(continuation), V] predicting each continuation token, fed the true ones."""
        logits, cache = self.prefill(prompt)
        out = []
        for i, tok in enumerate(continuation):
            out.append(_np(logits[0]))
            if i + 1 < len(continuation):
                logits, cache = self.step(jnp.asarray([tok]), cache)
        return np.stack(out)


# Tests compile many tiny programs (one per model config and prompt shape) and run each for
# milliseconds: XLA's backend (LLVM) optimizations roughly double compile time for no gain here.
# The computation is the same HLO (no fast-math either way); only codegen, so at most last-bit
# rounding differences.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn: Callable, **kw) -> Callable:
    """`jax.jit` with fast-compile options for tiny test models."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


_JIT_CACHE: dict[tuple, Callable] = {}


def _step_over_state(model, tokens, state, active):
    """The decode loop's step protocol as one state-dict step (tests)."""
    logits, carry = model.step(tokens, model.loop_carry(state), active)
    return logits, model.state_dict(carry)


def _jitted(graphdef, method: str) -> Callable:
    key = (graphdef, method)
    if key not in _JIT_CACHE:
        if method == "step":
            fn = lambda state, *args: _step_over_state(nnx.merge(graphdef, state), *args)  # noqa: E731
        else:
            fn = lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args)  # noqa: E731
        _JIT_CACHE[key] = fast_jit(fn)
    return _JIT_CACHE[key]


@pytest.fixture(scope="session")
def jax_runner() -> Callable[[Mamba2LM], JaxRunner]:
    """`jax_runner(model)` -> JaxRunner with jitted prefill/step/forward/greedy."""
    return JaxRunner


@pytest.fixture(scope="session", name="fast_jit")
def fast_jit_fixture() -> Callable:
    """`fast_jit(fn, **jit_kwargs)`: jax.jit with fast-compile options (tiny test models)."""
    return fast_jit


@pytest.fixture(scope="session")
def make_random_params() -> Callable[..., dict]:
    """`make_random_params(cfg, seed=0, std=0.2, dtype=f32)` -> {HF name: array}."""
    return random_params


@pytest.fixture(scope="session")
def tiny_config() -> Mamba2Config:
    """A tiny config (64 hidden, 2 layers, 8 heads of 16, state 16, chunk 16, vocab 200)."""
    return Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=200, state_size=16, head_dim=16,
        n_groups=1, chunk_size=16, name="tiny",
    )


@pytest.fixture(scope="session")
def tiny_random_model(tiny_config) -> Mamba2LM:
    """Our model over `random_params(tiny_config, seed=0)` (no checkpoint, no torch)."""
    return bind(tiny_config, random_params(tiny_config, seed=0))


# ---------------------------------------------------------------------------------------------
# HF reference checkpoints (torch imported lazily).


def load_our_model(path: str | Path, dtype=jnp.float32) -> tuple[Mamba2Config, Mamba2LM]:
    """Load an HF checkpoint directory into our model through `exporter.loading.load_model`.

    `weights` is passed explicitly: this loads the checkpoint whatever `load_model`'s default
    (its default for a directory is tested on its own in test_parity_hf.py).
    """
    from exporter.loading import load_model

    return load_model(str(path), weights=str(path), dtype=dtype)


@pytest.fixture(scope="session")
def load_checkpoint() -> Callable[..., tuple[Mamba2Config, Mamba2LM]]:
    """`load_checkpoint(path, dtype=f32)` -> (cfg, model) through exporter.loading.load_model."""
    return load_our_model


@dataclasses.dataclass
class HFCheckpoint:
    """A saved HF checkpoint, the torch model it came from, and our fp32 model loaded from it."""

    path: Path
    hf_model: Any  # transformers.Mamba2ForCausalLM (fp32, eval)
    cfg: Mamba2Config
    model: Mamba2LM
    runner: JaxRunner


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[..., HFCheckpoint]:
    """`hf_checkpoint(name, seed=0, **hf_config_overrides)` -> HFCheckpoint, built once per name.

    The HF model is `hf_reference.make_hf_model(seed, **overrides)` (tiny defaults in
    `hf_reference.TINY`), saved as is with `save_pretrained` to a session temp dir (so its
    config.json spells inf as transformers 5 does: `{"__float__": "Infinity"}`).
    """
    built: dict[str, HFCheckpoint] = {}

    def make(name: str, seed: int = 0, **overrides) -> HFCheckpoint:
        if name not in built:
            import hf_reference

            hf_model = hf_reference.make_hf_model(seed=seed, **overrides)
            path = hf_reference.save_checkpoint(hf_model, tmp_path_factory.mktemp(f"hf-{name}"))
            cfg, model = load_our_model(path)
            built[name] = HFCheckpoint(path, hf_model, cfg, model, JaxRunner(model))
        return built[name]

    return make


@pytest.fixture(scope="session")
def tiny_hf(hf_checkpoint) -> HFCheckpoint:
    """Tiny tied-head checkpoint: 2 layers, 1 group, chunk 16."""
    return hf_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_hf_groups(hf_checkpoint) -> HFCheckpoint:
    """3 layers, n_groups=2 (4 heads per group), in/out_proj biases."""
    return hf_checkpoint("groups2", seed=1, n_groups=2, num_hidden_layers=3, use_bias=True)


@pytest.fixture(scope="session")
def tiny_hf_untied(hf_checkpoint) -> HFCheckpoint:
    """Untied lm_head (`tie_word_embeddings=False`), no conv bias."""
    return hf_checkpoint("untied", seed=2, tie_word_embeddings=False, use_conv_bias=False)


# CI runs must be reproducible: the same hypothesis examples every run.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
