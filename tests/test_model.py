"""The JAX model on its own: chunked prefill vs the recurrence, ragged batches, preset sizes and
config parsing, and bfloat16 mode."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exporter.config import PRESETS, Mamba2Config, load_config
from exporter.params import bind, count_params, param_shapes
from exporter.state import empty_state, stack_layers, state_shapes


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = np.abs(theirs).max()
    return float(np.abs(ours - theirs).max() / (scale if scale > 0 else 1.0))


# ---------------------------------------------------------------------------------------------
# 3. Chunked prefill == step-by-step recurrence from an empty cache.

# 2 layers, 2 groups of 4 heads (head_dim 8), state 8: small enough to compile in about a second.
RECUR_CFG = Mamba2Config(
    hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8, head_dim=8, n_groups=2,
    chunk_size=16, name="recur",
)


# A non-default dt clamp (it binds for these weights). Our step applies time_step_limit like
# our chunked scan does, so the two must agree under it too (HF's decode step ignores it; see
# test_time_step_limit_prefill in test_parity_hf.py).
DT_LIMIT = (0.01, 0.2)


@pytest.fixture(scope="module")
def recur(make_random_params, jax_runner):
    params = make_random_params(RECUR_CFG, seed=3)
    # Stepping models keep one config per limit (step ignores chunk_size): `step` compiles twice.
    steppers = {
        limited: jax_runner(bind(dataclasses.replace(RECUR_CFG, time_step_limit=DT_LIMIT) if limited else RECUR_CFG, params))
        for limited in (False, True)
    }
    return params, steppers


def _prefill(fast_jit, cfg, params, tokens):
    """Prefill with a one-off jit: the chunk size is part of the (static) config."""
    run = fast_jit(lambda p, x: bind(cfg, p).prefill(empty_state(cfg, x.shape[0]), x,
                                                      jnp.full((x.shape[0],), x.shape[1], jnp.int32)))
    return run(params, jnp.asarray(tokens, jnp.int32))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    length=st.integers(1, 40),
    chunk=st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32]),
    seed=st.integers(0, 2**16),
    limited=st.booleans(),
)
@example(length=1, chunk=16, seed=0, limited=False)  # shorter than the conv window
@example(length=16, chunk=16, seed=1, limited=False)  # exactly one chunk
@example(length=33, chunk=8, seed=2, limited=True)  # several chunks and a partial one; dt clamped
def test_chunked_prefill_equals_recurrence(recur, fast_jit, length, chunk, seed, limited):
    """prefill's last logits and final cache (conv window and SSM state of every layer) equal
    `length` O(1) steps from an empty cache."""
    params, steppers = recur
    stepper = steppers[limited]
    cfg = dataclasses.replace(stepper.cfg, chunk_size=chunk)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, length))
    last, cache = _prefill(fast_jit, cfg, params, tokens)
    cache = stack_layers(cache)

    step_cache = stepper.empty_state(1)
    for t in range(length):
        logits, step_cache = stepper.step(tokens[:, t], step_cache)
    step_cache = stack_layers(step_cache)

    assert rel_diff(last, logits) < 1e-4
    assert cache["conv"].dtype == step_cache["conv"].dtype and cache["ssm"].dtype == jnp.float32
    assert cache["conv"].shape == step_cache["conv"].shape and cache["ssm"].shape == step_cache["ssm"].shape
    assert rel_diff(cache["conv"], step_cache["conv"]) < 1e-5
    assert rel_diff(cache["ssm"], step_cache["ssm"]) < 1e-4


# ---------------------------------------------------------------------------------------------
# 4. A ragged right-padded batch == each prompt alone.


def test_ragged_batch_equals_each_prompt_alone(tiny_hf):
    runner, cfg = tiny_hf.runner, tiny_hf.cfg
    lengths = [40, 17, 1, 16, 0]
    rng = np.random.default_rng(5)
    # Padding holds random tokens, not pad ids: it must be ignored whatever it is.
    batch = rng.integers(0, cfg.vocab_size, (len(lengths), max(lengths)))
    logits, state = runner.prefill(batch, lengths)
    cache = stack_layers(state)
    assert logits.shape == (len(lengths), cfg.vocab_size)
    assert cache["conv"].shape[1] == cache["ssm"].shape[1] == len(lengths)

    # Then a few decode steps in the batch, row by row against decoding alone.
    n_steps = 4
    next_tokens = rng.integers(0, cfg.vocab_size, (n_steps, len(lengths)))
    batch_steps, c = [], state
    for s in range(n_steps):
        lg, c = runner.step(next_tokens[s], c)
        batch_steps.append(np.asarray(lg))

    for i, n in enumerate(lengths):
        if n == 0:  # an empty prompt leaves the cache empty (its prefill logits are meaningless)
            assert not np.any(np.asarray(cache["conv"][:, i])) and not np.any(np.asarray(cache["ssm"][:, i]))
            continue
        alone_logits, alone = runner.prefill(batch[i : i + 1, :n])
        alone_state, alone = alone, stack_layers(alone)
        assert rel_diff(logits[i], alone_logits[0]) < 1e-5, f"row {i}"
        assert rel_diff(cache["conv"][:, i], alone["conv"][:, 0]) < 1e-5, f"row {i}"
        assert rel_diff(cache["ssm"][:, i], alone["ssm"][:, 0]) < 1e-5, f"row {i}"
        for s in range(n_steps):
            lg, alone_state = runner.step(next_tokens[s, i : i + 1], alone_state)
            assert rel_diff(batch_steps[s][i], lg[0]) < 1e-5, f"row {i} step {s}"


# ---------------------------------------------------------------------------------------------
# 5. Presets and configs build abstractly with the right sizes.


def expected_param_count(cfg: Mamba2Config) -> int:
    """Unique parameters, from the Mamba-2 architecture (independent of exporter.params)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    inner = cfg.expand * d
    heads = inner // cfg.head_dim if cfg.num_heads == 0 else cfg.num_heads
    conv_ch = inner + 2 * cfg.n_groups * cfg.state_size  # x, B, C
    in_proj_out = inner + conv_ch + heads  # z, xBC, dt
    per_layer = (
        d  # pre-norm
        + d * in_proj_out + (in_proj_out if cfg.use_bias else 0)
        + conv_ch * cfg.conv_kernel + (conv_ch if cfg.use_conv_bias else 0)
        + 3 * heads  # dt_bias, A_log, D
        + inner  # gated norm
        + inner * d + (d if cfg.use_bias else 0)  # out_proj
    )
    head = 0 if cfg.tie_word_embeddings else V * d
    return V * d + L * per_layer + d + head  # embedding, layers, norm_f, lm_head


NOMINAL = {"130m": 130e6, "370m": 370e6, "780m": 780e6, "1.3b": 1.3e9, "2.7b": 2.7e9}
PRESET_SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}


def _abstract_prefill_and_step(cfg: Mamba2Config, dtype=jnp.float32, t: int = 64):
    shapes = param_shapes(cfg, dtype)
    tok = jax.ShapeDtypeStruct((2, t), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    logits, cache = jax.eval_shape(lambda p, s, x, n: bind(cfg, p, dtype).prefill(s, x, n), shapes,
                                   state_shapes(cfg, 2, dtype), tok, lengths)
    want = state_shapes(cfg, 2, dtype)
    assert logits.shape == (2, cfg.vocab_size) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == jax.tree.map(lambda a: (a.shape, a.dtype), want)
    assert cache["ssm.0"].dtype == jnp.float32 and cache["conv.0"].shape == (2, cfg.conv_kernel - 1, cfg.conv_dim)
    return shapes, cache


def test_preset_130m_size():
    cfg = PRESETS["130m"]
    assert count_params(cfg) == 128_989_632 == expected_param_count(cfg)
    assert "lm_head.weight" not in param_shapes(cfg)  # tied head
    _, cache = _abstract_prefill_and_step(cfg)
    def step(p, x, c):
        model = bind(cfg, p)
        logits, carry = model.step(x, model.loop_carry(c), jnp.ones((2,), bool))
        return logits, model.state_dict(carry)

    logits, cache2 = jax.eval_shape(step, param_shapes(cfg), jax.ShapeDtypeStruct((2,), jnp.int32), cache)
    assert logits.shape == (2, cfg.vocab_size)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache2) == jax.tree.map(lambda a: (a.shape, a.dtype), cache)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_abstractly(name):
    """Every preset's abstract parameter tree matches the architecture formula and its name."""
    cfg = PRESETS[name]
    d, layers = PRESET_SHAPES[name]
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (d, layers)
    assert cfg.vocab_size == 50288  # 50277 padded to a multiple of 16
    assert (cfg.state_size, cfg.head_dim, cfg.expand, cfg.n_groups, cfg.conv_kernel) == (128, 64, 2, 1, 4)
    assert cfg.tie_word_embeddings and cfg.num_heads == 2 * d // 64
    n = count_params(cfg)
    assert n == expected_param_count(cfg)
    assert abs(n / NOMINAL[name] - 1) < 0.05, f"{name}: {n:,}"
    # param_shapes builds the model under nnx.eval_shape; tracing prefill/step is done for 130m
    # and the Codestral shape only (tracing 48-64 unrolled layers costs seconds per preset).


CODESTRAL_JSON = """{
  "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
  "hidden_size": 4096, "num_hidden_layers": 64, "n_groups": 8, "num_heads": 128, "head_dim": 64,
  "vocab_size": 32768, "state_size": 128, "expand": 2, "conv_kernel": 4, "chunk_size": 256,
  "tie_word_embeddings": false, "use_bias": false, "use_conv_bias": true, "residual_in_fp32": true,
  "layer_norm_epsilon": 1e-05, "rms_norm": true, "hidden_act": "silu",
  "time_step_limit": [0.0, Infinity], "time_step_min": 0.001, "time_step_max": 0.1,
  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16"
}"""


def test_codestral_config_builds_abstractly(tmp_path):
    (tmp_path / "config.json").write_text(CODESTRAL_JSON)  # a literal `Infinity`, as HF 4.x wrote
    cfg = load_config(str(tmp_path))
    assert cfg.time_step_limit == (0.0, math.inf)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_groups, cfg.num_heads, cfg.head_dim) == (4096, 64, 8, 128, 64)
    assert cfg.vocab_size == 32768 and not cfg.tie_word_embeddings and cfg.eos_token_id == 2
    shapes = param_shapes(cfg, jnp.bfloat16)
    assert shapes["lm_head.weight"].shape == (32768, 4096)
    assert shapes["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 8192 + 2 * 8 * 128 + 128, 4096)
    assert all(s.dtype == jnp.bfloat16 for s in shapes.values())
    n = count_params(cfg)
    assert n == expected_param_count(cfg)
    assert 7.0e9 < n < 7.5e9  # "7B"
    _abstract_prefill_and_step(cfg, jnp.bfloat16, t=16)


def test_config_json_time_step_limit_infinity(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 200,
        "state_size": 16, "head_dim": 16, "num_heads": 8, "n_groups": 1, "chunk_size": 16,
        "tie_word_embeddings": True, "time_step_limit": [0.0, math.inf],  # json writes Infinity
    }))
    assert "Infinity" in (tmp_path / "config.json").read_text()
    cfg = load_config(str(tmp_path / "config.json"))
    assert cfg.time_step_limit == (0.0, math.inf)
    assert Mamba2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------------------
# 6. bfloat16 weights.

# bf16 keeps 8 significand bits (unit roundoff 2^-8 ~ 0.4%). Weights and every matmul output are
# rounded to it, over 2 layers of ~4 roundings each plus the head, so a relative logit error of a
# few percent of the largest logit is the expected scale (measured 1.5%); 5% still catches real
# bugs (a wrong dtype path or a state kept in bf16 shows up as tens of percent or divergence).
BF16_LOGITS_RTOL = 5e-2
BF16_MIN_AGREEMENT = 0.9  # teacher-forced argmax agreement with fp32 over 64 positions (measured 0.97-1)


def test_bfloat16_mode(tiny_hf, jax_runner, load_checkpoint):
    cfg, model = load_checkpoint(tiny_hf.path, dtype=jnp.bfloat16)
    assert model.backbone.embeddings.weight[...].dtype == jnp.bfloat16
    bf16 = jax_runner(model)
    tokens = np.random.default_rng(11).integers(0, cfg.vocab_size, 40).tolist()

    logits, cache = bf16.prefill(tokens)
    cache = stack_layers(cache)
    assert logits.dtype == jnp.float32
    assert cache["ssm"].dtype == jnp.float32 and cache["conv"].dtype == jnp.bfloat16
    fp32_logits, fp32_cache = tiny_hf.runner.prefill(tokens)
    fp32_cache = stack_layers(fp32_cache)
    assert rel_diff(logits, fp32_logits) < BF16_LOGITS_RTOL
    assert rel_diff(cache["ssm"], fp32_cache["ssm"]) < BF16_LOGITS_RTOL

    # Greedy: feed fp32's greedy path to the bf16 model; argmaxes mostly agree, and wherever they
    # differ the bf16 choice is a near-tie in fp32 (within the bf16 tolerance of fp32's best).
    fp32_tokens, fp32_step_logits = tiny_hf.runner.greedy(tokens, 64)
    bf16_logits = bf16.teacher_forced(tokens, fp32_tokens)
    bf16_choice = bf16_logits.argmax(-1)
    agree = np.mean(bf16_choice == np.asarray(fp32_tokens))
    assert agree >= BF16_MIN_AGREEMENT, agree
    scale = np.abs(fp32_step_logits).max()
    for i in np.flatnonzero(bf16_choice != np.asarray(fp32_tokens)):
        row = fp32_step_logits[i]
        assert row.max() - row[bf16_choice[i]] < 2 * BF16_LOGITS_RTOL * scale

    # Free-running bf16 greedy follows fp32 until a near-tie: where it first leaves fp32's path
    # (same prefix so far), its choice is within the bf16 tolerance of fp32's best there.
    bf16_tokens, _ = bf16.greedy(tokens, 64)
    first = next((i for i, (a, b) in enumerate(zip(bf16_tokens, fp32_tokens)) if a != b), None)
    if first is not None:
        row = fp32_step_logits[first]
        assert row.max() - row[bf16_tokens[first]] < 2 * BF16_LOGITS_RTOL * scale
