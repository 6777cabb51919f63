"""The same model as a TensorFlow SavedModel for TF Serving, through jax2tf.

`write_savedmodel` converts the very functions the jax.export artifact holds
(`ModelFunctions.prefill` and `.decode`) with `jax.experimental.jax2tf.convert` (native
serialization: each signature is one XlaCallModule op holding StableHLO) and writes TF Serving's
layout `<out>/<version>/{saved_model.pb, variables/}` atomically. Weights are `tf.Variable`s
(read from `variables/`), never graph constants, so any model size stays under GraphDef's 2 GB
limit; batch `b` and prompt length `t` are polymorphic.

Signatures (every input is required; scalars are rank-0 tensors):

  generate (also serving_default): greedy, stops at the model's eos id like the runtime's default
      tokens int32[b, t] (right-padded), lengths int32[b] (each in [1, t]),
      max_new_tokens int32[] (in [1, N])
      -> tokens int32[b, N]: row i's new tokens are tokens[i, :counts[i]] (eos included when
         hit), then -1; counts int32[b].  N is the export's decode block (fixed: an output
         shape cannot depend on an input value).
  sample: generate's inputs plus temperature f32[] (0 = greedy), top_k int32[] (0 = off),
      top_p f32[] (1 = off), min_p f32[] (0 = off), seed int64[] (>= 0) -> same outputs.
      Row i draws with the key fold_in(key(seed), i) (threefry; key(seed) = [seed >> 32, seed
      mod 2**32], as jax builds it from a 64-bit seed), computed inside the graph exactly like
      `runtime.engine.rng.row_keys(seed, rows)`, so TF-only callers get the runtime's tokens.
  prefill: tokens int32[b, t], lengths int32[b]
      -> logits f32[b, V] (next-token logits after each prompt), cache_conv [L, b, K-1, C]
         (model dtype), cache_ssm f32[L, b, H, P, N]: the recurrent cache after the prompt.

Inputs are checked in the graph (TF Serving answers a bad request with INVALID_ARGUMENT): token
ids inside each row's length in [0, V) (the padded tail is ignored, whatever it holds), lengths in [1, t], max_new_tokens in [1, N] and the
sampling ranges the runtime enforces. Batch size and prompt length are not capped (memory is).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from runtime.errors import ExportError, Mamba2AOTError

from runtime.format.manifest import Limits

from exporter.config import Mamba2Config
from exporter.functions import ModelFunctions
from exporter.params import param_shapes
from exporter.sampling import RNG_IMPL
from exporter.state import empty_state, stack_layers

SIGNATURES = ("serving_default", "generate", "sample", "prefill")
GENERATE_INPUTS = ("tokens", "lengths", "max_new_tokens")
SAMPLE_INPUTS = (*GENERATE_INPUTS, "temperature", "top_k", "top_p", "min_p", "seed")
PREFILL_INPUTS = ("tokens", "lengths")


def _import_tf():
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise ExportError(f"the SavedModel export needs tensorflow ({e}): "
                          "pip install 'mamba2-aot[export]'") from e
    return tf, jax2tf


# -- the JAX functions that get converted ------------------------------------------------------

def generate_fn(fns: ModelFunctions):
    """(params, tokens[b, t], lengths[b], max_new_tokens[], temperature[], top_k[], top_p[],
    min_p[], seed_hi u32[], seed_lo u32[]) -> {"tokens": i32[b, N] (-1 after counts), "counts":
    i32[b]}: prefill from a fresh state, then the whole decode loop, stopping at the model's eos."""
    cfg, limits = fns.cfg, fns.limits

    def run(params, tokens, lengths, max_new_tokens, temperature, top_k, top_p, min_p, seed_hi, seed_lo):
        b = tokens.shape[0]
        logits, state = fns.prefill(params, empty_state(cfg, b, fns.dtype), tokens, lengths)
        # == runtime.engine.rng.row_keys: row i's key is fold_in(key(seed), i)
        base = jax.random.wrap_key_data(jnp.stack([seed_hi, seed_lo]), impl=RNG_IMPL)
        keys = jax.vmap(lambda row: jax.random.key_data(jax.random.fold_in(base, row)))(
            jnp.arange(b, dtype=jnp.int32))  # [b, 2]
        stop_ids = jnp.full((b, limits.max_stop_tokens), -1, jnp.int32)
        if cfg.eos_token_id is not None:
            stop_ids = stop_ids.at[:, 0].set(cfg.eos_token_id)
        row = lambda v, dtype: jnp.full((b,), v, dtype)  # noqa: E731 - a per-row copy of a setting
        out, counts, _, _, _ = fns.decode(
            params, state, logits, lengths <= 0, row(max_new_tokens, jnp.int32), row(0, jnp.int32),
            keys, row(temperature, jnp.float32), row(top_k, jnp.int32), row(top_p, jnp.float32),
            row(min_p, jnp.float32), stop_ids)
        out = jnp.where(jnp.arange(out.shape[1])[None, :] < counts[:, None], out, -1)
        return {"tokens": out, "counts": counts}

    return run


def prefill_fn(fns: ModelFunctions):
    def run(params, tokens, lengths):
        logits, state = fns.prefill(params, empty_state(fns.cfg, tokens.shape[0], fns.dtype), tokens, lengths)
        stacked = stack_layers(state)  # one [L, b, ...] array per kind for TF callers
        return {"logits": logits, "cache_conv": stacked["conv"], "cache_ssm": stacked["ssm"]}

    return run


# -- the TF module -----------------------------------------------------------------------------

def _variables(tf, cfg: Mamba2Config, params: Mapping, dtype) -> dict:
    """{HF name: tf.Variable} in param_shapes order, checked against the model's shapes."""
    shapes = param_shapes(cfg, dtype)
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes]
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ExportError(f"params do not match the model: {what} "
                          f"({len(missing)} missing, {len(extra)} unexpected)")
    out = {}
    for name, spec in shapes.items():
        value = np.asarray(params[name])
        if tuple(value.shape) != tuple(spec.shape):
            raise ExportError(f"param {name} has shape {tuple(value.shape)}, "
                              f"expected {tuple(spec.shape)}")
        value = value.astype(jnp.dtype(spec.dtype), copy=False)
        out[name] = tf.Variable(value, trainable=False, name=name)
    return out


def _checks(tf, cfg: Mamba2Config, limits: Limits, tokens, lengths, max_new_tokens=None,
            sampling=None) -> list:
    """In-graph request validation, mirroring runtime.engine.requests (one-line messages)."""
    dbg = tf.debugging
    t = tf.shape(tokens)[1]
    ops = [
        dbg.assert_equal(tf.shape(lengths)[0], tf.shape(tokens)[0],
                         message="lengths must have one entry per row of tokens"),
        dbg.assert_greater_equal(lengths, 1, message="every length must be >= 1 (no empty prompts)"),
        dbg.assert_less_equal(lengths, t, message="a length is over the padded prompt length t"),
    ]
    valid = tf.range(t)[None, :] < lengths[:, None]
    in_vocab = (tokens >= 0) & (tokens < cfg.vocab_size)
    ops.append(dbg.Assert(tf.reduce_all(in_vocab | ~valid),
                          [f"token ids must be in [0, {cfg.vocab_size})"]))
    if max_new_tokens is not None:
        cap = limits.decode_block
        ops.append(dbg.Assert((max_new_tokens >= 1) & (max_new_tokens <= cap),
                              [f"max_new_tokens must be in [1, {cap}] (the export's cap)"]))
    if sampling is not None:
        temperature, top_k, top_p, min_p, seed = sampling
        ops += [
            dbg.Assert(tf.math.is_finite(temperature) & (temperature >= 0),
                       ["temperature must be >= 0 (0 = greedy)"]),
            dbg.Assert(top_k >= 0, ["top_k must be >= 0 (0 = off)"]),
            dbg.Assert((top_p > 0) & (top_p <= 1), ["top_p must be in (0, 1]"]),
            dbg.Assert((min_p >= 0) & (min_p < 1), ["min_p must be in [0, 1)"]),
            dbg.Assert(seed >= 0, ["seed must be >= 0"]),
        ]
    return ops


def build_module(cfg: Mamba2Config, params: Mapping, dtype, limits: Limits,
                 platforms=("cpu",), progress: Callable[[str, float], None] | None = None):
    """(tf.Module holding the weights as variables, {signature name: concrete function})."""
    tf, jax2tf = _import_tf()
    progress = progress or (lambda *a: None)
    fns = ModelFunctions(cfg, jnp.dtype(dtype), limits, top_k_cap=0)  # TF's StableHLO lacks lax.top_k's composite
    convert = dict(with_gradient=False, native_serialization_platforms=tuple(platforms))
    batch = (None, "(b, t)", "(b,)")  # params fixed; tokens [b, t], lengths [b]; the rest scalars
    gen_jax = jax2tf.convert(generate_fn(fns), polymorphic_shapes=batch + (None,) * 7, **convert)
    pre_jax = jax2tf.convert(prefill_fn(fns), polymorphic_shapes=batch, **convert)

    module = tf.Module()
    module.params = _variables(tf, cfg, params, dtype)
    i32, f32 = tf.int32, tf.float32
    spec = tf.TensorSpec
    toks, lens = spec([None, None], i32, name="tokens"), spec([None], i32, name="lengths")
    n = spec([], i32, name="max_new_tokens")

    # One inner function holds the converted loop; generate and sample both call it, so the
    # SavedModel stores its StableHLO once.
    @tf.function(autograph=False, input_signature=[
        toks, lens, n, spec([], f32), spec([], i32), spec([], f32), spec([], f32), spec([], tf.uint32),
        spec([], tf.uint32)])
    def _loop(tokens, lengths, max_new_tokens, temperature, top_k, top_p, min_p, seed_hi, seed_lo):
        return gen_jax(module.params, tokens, lengths, max_new_tokens,
                       temperature, top_k, top_p, min_p, seed_hi, seed_lo)

    @tf.function(autograph=False, input_signature=[toks, lens, n])
    def generate(tokens, lengths, max_new_tokens):
        with tf.control_dependencies(_checks(tf, cfg, limits, tokens, lengths, max_new_tokens)):
            zero = tf.constant(0, tf.uint32)
            return _loop(tokens, lengths, max_new_tokens, tf.constant(0.0), tf.constant(0),
                         tf.constant(1.0), tf.constant(0.0), zero, zero)

    @tf.function(autograph=False, input_signature=[
        toks, lens, n, spec([], f32, name="temperature"), spec([], i32, name="top_k"),
        spec([], f32, name="top_p"), spec([], f32, name="min_p"), spec([], tf.int64, name="seed")])
    def sample(tokens, lengths, max_new_tokens, temperature, top_k, top_p, min_p, seed):
        checks = _checks(tf, cfg, limits, tokens, lengths, max_new_tokens,
                         (temperature, top_k, top_p, min_p, seed))
        with tf.control_dependencies(checks):
            # jax's threefry key of a 64-bit seed: [high 32 bits, low 32 bits]
            hi = tf.cast(tf.bitwise.right_shift(seed, 32), tf.uint32)
            lo = tf.cast(tf.bitwise.bitwise_and(seed, 0xFFFFFFFF), tf.uint32)
            return _loop(tokens, lengths, max_new_tokens, temperature, top_k, top_p, min_p, hi, lo)

    @tf.function(autograph=False, input_signature=[toks, lens])
    def prefill(tokens, lengths):
        with tf.control_dependencies(_checks(tf, cfg, limits, tokens, lengths)):
            return pre_jax(module.params, tokens, lengths)

    concrete = {}
    for name, fn in (("generate", generate), ("sample", sample), ("prefill", prefill)):
        t0 = time.perf_counter()
        concrete[name] = fn.get_concrete_function()
        # A concrete function (not the tf.function) as attribute: saving does not trace it again.
        setattr(module, name, concrete[name])
        progress(f"convert {name}", time.perf_counter() - t0)
    concrete = {"serving_default": concrete["generate"], **concrete}
    return module, concrete


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise ExportError(f"version must be an integer >= 0 (TF Serving's version directory), "
                          f"got {version!r}")
    return int(version)


def _chmod_like_mkdir(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def write_savedmodel(cfg: Mamba2Config, params: Mapping, out_dir: Path, version: int, dtype,
                     limits: Limits, force: bool,
                     progress: Callable[[str, float], None] | None = None,
                     platforms=("cpu",)) -> Path:
    """Write `out_dir/<version>/` (saved_model.pb + variables/) atomically; returns that path.

    An existing version directory is refused unless `force` (then replaced whole). `progress`
    gets (step, seconds) after each conversion and after the save. `platforms` are the
    backends the StableHLO is lowered for (e.g. ("cpu", "cuda") for a CPU and a GPU server).
    """
    from runtime.tools.atomic import atomic_directory

    tf, _ = _import_tf()
    progress = progress or (lambda *a: None)
    dest = Path(out_dir) / str(_check_version(version))
    if dest.exists() and not force:
        raise ExportError(f"{dest} already exists: pass --force to replace it, or use another version")
    with atomic_directory(dest, force=force) as tmp:
        _chmod_like_mkdir(tmp)  # mkdtemp makes it 0700; a serving container may run as another user
        module, signatures = build_module(cfg, params, dtype, limits, platforms, progress)
        t0 = time.perf_counter()
        try:
            tf.saved_model.save(module, os.fspath(tmp), signatures=signatures)
        except (tf.errors.OpError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"cannot write the SavedModel to {dest}: {msg}") from e
        progress("save", time.perf_counter() - t0)
    return dest


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_savedmodel(model: str, weights: str | None, out: Path, version: int, force: bool,
                      echo: Callable[[str], None] = print, *, dtype=None, limits: Limits | None = None,
                      platforms=("cpu",), seed: int = 0) -> Path:
    """Load the config and weights ("random": seeded random weights) and write the SavedModel.

    `model` is a preset or HF checkpoint dir / config.json. Prints progress and a summary
    through `echo`; raises ExportError with a one-line message on bad input. Returns
    `out/<version>`.
    """
    from exporter.config import ConfigError, load_config
    from exporter.loading import load_params

    t_start = time.perf_counter()
    version = _check_version(version)
    platforms = tuple(dict.fromkeys(platforms))
    try:
        cfg = load_config(model)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    limits = limits or Limits(vocab_size=cfg.vocab_size, decode_block=256)
    from exporter.lowering import resolve_dtype

    dt = resolve_dtype(dtype, platforms)
    dest = Path(out) / str(version)
    if dest.exists() and not force:  # before any slow work
        raise ExportError(f"{dest} already exists: pass --force to replace it, or use another version")
    random = weights == "random"
    if weights is None:
        raise ExportError("a SavedModel binds its weights: pass --weights CHECKPOINT, or --weights random for "
                          "seeded random weights")
    if not random and not Path(weights).exists():
        raise ExportError(f"weights not found: {weights}")
    _import_tf()
    echo(f"warning: binding seeded random weights (seed {seed}), as asked: the outputs are meaningless"
         if random else f"weights: {weights}")
    try:
        params = load_params(cfg, None if random else str(weights), dt, seed)
    except Mamba2AOTError as e:
        raise ExportError(str(e)) from None
    param_bytes = sum(int(v.nbytes) for v in params.values())
    echo(f"exporting {cfg.name} ({cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}) as a "
         f"SavedModel, {dt.name} for {', '.join(platforms)}, up to {limits.decode_block} new "
         f"tokens -> {dest}")

    def progress(step, seconds):
        echo(f"  {step:<18} {seconds:6.2f} s")

    path = write_savedmodel(cfg, params, Path(out), version, dt, limits, force, progress, platforms)
    pb = (path / "saved_model.pb").stat().st_size
    variables = _tree_bytes(path / "variables")
    echo(f"wrote SavedModel {path}: saved_model.pb {pb / 1e3:.1f} kB, variables {variables / 1e6:.2f} MB "
         f"({param_bytes / 1e6:.2f} MB of weights), in {time.perf_counter() - t_start:.1f} s; "
         f"signatures: serving_default (= generate), generate, sample, prefill")
    return path
