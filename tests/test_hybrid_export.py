"""Hybrid artifacts: `export` of a hybrid checkpoint runs without model code, bit for bit like the
live functions; the runtime's generate gives HF's greedy tokens; the KV context is a limit;
inspect states the state's bytes; every hybrid preset lowers for tpu and cuda; SavedModel and
tensor-parallel exports of one family give the runtime's tokens.

One tiny Nemotron-H checkpoint (Mamba-2, attention, MLP and MoE layers; its experts stored one
tensor per expert and stacked by the weight spec) is exported once per module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime
from exporter.artifact import write_artifact
from exporter.functions import ModelFunctions
from exporter.hybrid_config import PRESETS, HybridConfig
from exporter.hybrid_params import count_params
from exporter.loading import load_params
from fixtures_artifacts import aot_cache_env, flatten, last_json, run_cli, run_python, subprocess_env  # noqa: F401
from hybrid_fixtures import LENGTHS, prompts
from runtime.errors import RequestError
from runtime.format.manifest import Limits, read_manifest
from runtime.format.weightspec import parse_weight_spec
from test_export import _RUN_EXPORTED, assert_trees_equal, decode_args

REPO = Path(__file__).resolve().parents[1]
NEW = 40
LIMITS = Limits(max_batch=4, max_prompt_tokens=128, max_new_tokens=64, max_stop_tokens=4, decode_block=16,
                max_prefill_tokens=256, max_context=160)


@dataclasses.dataclass
class Art:
    path: Path  # the artifact
    ckpt: Path  # the HF checkpoint it runs with
    hf: object
    cfg: HybridConfig
    fns: ModelFunctions
    params: dict
    params_file: Path  # our params as safetensors (our names: experts stacked)


@pytest.fixture(scope="module")
def art(tmp_path_factory, aot_cache_env) -> Art:
    import hybrid_reference as ref
    from safetensors.numpy import save_file

    from exporter.architectures import load_model_config

    root = tmp_path_factory.mktemp("hybrid-art")
    hf = ref.make_hf_model("nemotron_h", seed=0)
    ckpt = ref.save_checkpoint(hf, root / "ckpt")
    cfg = load_model_config(str(ckpt))
    fns = ModelFunctions(cfg, jnp.float32, LIMITS)
    write_artifact(fns, ["cpu"], root / "art", force=False)
    params = load_params(cfg, str(ckpt))
    save_file({k: np.asarray(v) for k, v in params.items()}, str(root / "params.safetensors"))
    return Art(root / "art", ckpt, hf, cfg, fns, params, root / "params.safetensors")


def _hf_rows(art, rows, n):
    import hybrid_reference as ref

    return [ref.hf_greedy(art.hf, r, n)[0] for r in rows]


def test_exported_bit_exact_in_fresh_process_without_model_code(art, tmp_path):
    """prefill (fresh and continued), greedy and sampled decode: the deserialized artifact in a
    process that cannot import exporter or flax gives the live functions' outputs bit for bit."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, art.cfg.vocab_size, (4, 16)).astype(np.int32)
    lengths = np.array([16, 9, 1, 0], np.int32)
    live_prefill, live_decode = jax.jit(art.fns.prefill), jax.jit(art.fns.decode)
    fresh = jax.tree.map(np.asarray, art.fns.empty_state(4))
    logits, state = live_prefill(art.params, fresh, tokens, lengths)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(11), 4)), np.uint32)
    stop = np.full((4,), -1, np.int32)
    cases = {
        "prefill": (fresh, tokens, lengths),
        "prefill-continued": (state, tokens[:, ::-1].copy(), lengths[::-1].copy()),
        "decode-greedy": decode_args(state, logits, budget=12, keys=keys, stop=stop),
        "decode-sampled": decode_args(state, logits, budget=12, keys=keys, stop=stop, temperature=0.9, top_k=20,
                                      top_p=0.95, min_p=0.02),
    }
    live = {}
    for name, args in cases.items():
        np.savez(tmp_path / f"{name}_in.npz", **flatten(args))
        fn = live_prefill if name.startswith("prefill") else live_decode
        live[name] = flatten(fn(art.params, *args))
    r = run_python(_RUN_EXPORTED, art.path, art.params_file, tmp_path, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout) == {"leaked": [], "cases": 4}
    for name, want in live.items():
        with np.load(tmp_path / f"{name}_out.npz", allow_pickle=False) as f:
            assert_trees_equal({k: f[k] for k in f.files}, want)
    assert {"1/k.1", "1/v.1", "1/pos", "1/conv.0", "1/ssm.0", "1/conv.4"} <= set(live["prefill"])


def test_runtime_generate_equals_hf_generate(art):
    """The runtime (its buckets, segments and decode blocks) on the HF checkpoint: a ragged batch's
    greedy tokens equal HF generate on each prompt alone; a prefix-cache hit changes nothing."""
    model = runtime.load(art.path, art.ckpt)
    rows = prompts(LENGTHS, art.cfg.vocab_size, seed=2)
    got = model.generate(rows, NEW, ignore_eos=True)
    assert got == _hf_rows(art, rows, NEW)

    cached = runtime.load(art.path, art.ckpt, prefix_cache_mb=4)
    history = rows[1]
    first = cached.complete([history], 8, ignore_eos=True)[0].tokens
    turn = history + first + rows[2]
    again = cached.complete([turn], 8, ignore_eos=True)[0].tokens
    assert cached.prefix_cache.stats.hits == 1  # started from the first turn's state (KV cache and all)
    assert again == _hf_rows(art, [turn], 8)[0]


def test_context_is_a_limit(art, capsys):
    """A request whose state + prompt + new tokens exceed max_context is refused in one line."""
    model = runtime.load(art.path, art.ckpt)
    assert model.limits["max_context"] == 160
    with pytest.raises(RequestError, match="context of 160"):
        model.generate([list(range(1, 121))], 41, ignore_eos=True)
    assert len(model.generate([list(range(1, 121))], 40, ignore_eos=True)[0]) == 40


def test_inspect_states_state_bytes(art):
    m = read_manifest(art.path)
    state = m.model["state"]
    H = art.cfg
    assert m.model["architecture"] == "hybrid" and m.model["family"] == "nemotron_h"
    assert state["bytes_per_token"] == 2 * H.num_key_value_heads * H.head_dim * 4  # one attention layer, fp32
    assert state["kv_capacity"] == 160 and state["grows_with_length"] is True
    assert state["bytes_per_sequence"] == state["bytes_fixed"] + 160 * state["bytes_per_token"]
    # the runtime's own count of the state leaves agrees
    assert runtime.load(art.path, art.ckpt).state_layout.bytes_per_sequence == state["bytes_per_sequence"]
    r = run_cli("inspect", str(art.path), env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "state.bytes_per_token" in r.stdout and '"nemotron_h"' in r.stdout


def test_memory_bound_covers_xla_own_analysis():
    """The manifest's prefill bound is at least what XLA allocates, for every tiny family."""
    import hybrid_reference as ref

    from exporter.hybrid_config import from_hf_config

    for name in ("bamba", "nemotron_h", "granite_moe", "falcon_h1", "zamba2"):
        hf = {**ref.TINY[name]}
        cfg = from_hf_config(hf)
        fns = ModelFunctions(cfg, jnp.float32, LIMITS)
        B, T = 4, 64
        compiled = jax.jit(fns.prefill).lower(*fns.prefill_args(B, T)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        bound = fns.arch.prefill_bytes(cfg, jnp.float32, B * T, fns.numerics.chunk_size, B, LIMITS.max_context)
        assert temp <= bound, (name, temp, bound)


@pytest.mark.slow
def test_all_hybrid_presets_lower_for_tpu_and_cuda(tmp_path):
    """Every preset's prefill and decode lower for tpu and cuda from abstract shapes (no weights):
    one jax.export per function for both platforms (one trace; the cuda numerics, which differ
    from tpu's only in a precision flag); small modules, the published parameter count, the KV
    capacity in the state. One preset also goes through write_artifact (per-platform numerics,
    flattened modules, manifest)."""
    t0 = time.perf_counter()
    limits = Limits(max_batch=8, max_prompt_tokens=4096, max_new_tokens=1024, max_context=4352)
    for name, cfg in PRESETS.items():
        fns = ModelFunctions(cfg, jnp.bfloat16, limits, platform="cuda")
        for fn in ("prefill", "decode"):
            exported = jax.export.export(jax.jit(getattr(fns, fn)), platforms=("tpu", "cuda"))(
                *getattr(fns, f"{fn}_args")())
            size = len(exported.serialize())
            assert exported.platforms == ("tpu", "cuda") and size < 3_000_000, (name, fn, size)
            if fn == "prefill":
                state = exported.in_avals[1:1 + len(fns.state_specs("b"))]
        shapes = fns.state_specs(1)
        attention = cfg.attention_layers[0]
        assert shapes[f"k.{attention}"].shape[1] == 4352 and shapes["pos"].shape == (1,)
        assert len(state) == len(shapes)
        assert parse_weight_spec(fns.arch.weight_spec(cfg, jnp.bfloat16)).num_params == count_params(cfg)
    elapsed = time.perf_counter() - t0

    cfg = PRESETS["falcon-h1-tiny-90m"]
    with warnings.catch_warnings():  # flattening must succeed for every module (exporter.flatten)
        warnings.simplefilter("error", RuntimeWarning)
        manifest = write_artifact(ModelFunctions(cfg, jnp.bfloat16, limits), ["tpu", "cuda"], tmp_path / "a",
                                  force=False)
    assert manifest["platforms"] == ["tpu", "cuda"] and manifest["model"]["family"] == "falcon_h1"
    assert manifest["limits"]["max_context"] == 4352
    assert manifest["model"]["numerics"]["tpu"]["intra_precision"] == "high"
    print(f"\nlowered {len(PRESETS)} hybrid presets for (tpu, cuda) in {elapsed:.1f} s")


# ------------------------------------------------------------------ SavedModel and tensor parallel

TF_GENERATE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    req = json.loads(sys.stdin.read())
    model = tf.saved_model.load(req["path"])
    out = model.signatures["generate"](tokens=tf.constant(req["tokens"], tf.int32),
                                       lengths=tf.constant(req["lengths"], tf.int32),
                                       max_new_tokens=tf.constant(req["n"], tf.int32))
    print(json.dumps({"tokens": out["tokens"].numpy().tolist(), "counts": out["counts"].numpy().tolist()}))
""")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_savedmodel_gives_the_runtime_tokens(art, tmp_path):
    """The hybrid as a TF Serving SavedModel: its generate signature (TensorFlow alone) gives the
    runtime's greedy tokens for a ragged batch, stopping at eos like the runtime's default."""
    from exporter.savedmodel import export_savedmodel

    limits = dataclasses.replace(LIMITS, decode_block=16)
    path = export_savedmodel(str(art.ckpt), str(art.ckpt), tmp_path / "sm", 1, False, echo=lambda *_: None,
                             limits=limits)
    rows = prompts(LENGTHS, art.cfg.vocab_size, seed=5)
    tokens = np.zeros((3, max(LENGTHS)), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    req = {"path": str(path), "tokens": tokens.tolist(), "lengths": LENGTHS, "n": 16}
    r = subprocess.run([sys.executable, "-c", TF_GENERATE], input=json.dumps(req), capture_output=True, text=True,
                       timeout=600, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    want = runtime.load(art.path, art.ckpt).generate(rows, 16)  # stops at eos, as generate does
    assert [row[:n] for row, n in zip(out["tokens"], out["counts"])] == want


_TP_RUN = textwrap.dedent("""
    import json, sys
    import jax
    import runtime
    art, ckpt, prompts, n = json.loads(sys.argv[1])
    m = runtime.load(art, ckpt)
    spec = {k: [e for e in v.sharding.spec] for k, v in m.params.items()}
    print(json.dumps({"devices": jax.device_count(), "tokens": m.generate(prompts, n, ignore_eos=True),
                      "q_proj": spec["backbone.layers.1.mixer.q_proj.weight"],
                      "experts": spec["backbone.layers.3.mixer.experts.up_proj"]}))
""")


def test_tensor_parallel_export_gives_the_same_tokens(art, tmp_path):
    """--devices 4: attention heads, MLP and experts split over a 4-device mesh (GSPMD); the
    runtime on 4 host devices gives the single-device tokens."""
    out = tmp_path / "tp"
    r = run_cli("export", "--model", str(art.ckpt), "--platform", "cpu", "--out", str(out), "--devices", "4",
                "--max-batch", "4", "--max-prompt-tokens", "128", "--max-new-tokens", "64", "--decode-block", "16",
                "--max-context", "160", "--max-stop-tokens", "4", env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "tensor parallel over 4 devices" in r.stdout
    rows = prompts(LENGTHS, art.cfg.vocab_size, seed=6)
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = run_python(_TP_RUN, json.dumps([str(out), str(art.ckpt), rows, 24]), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = last_json(r.stdout)
    assert rep["devices"] == 4
    assert rep["q_proj"][0] == "model" and rep["experts"][0] == "model"
    assert rep["tokens"] == runtime.load(art.path, art.ckpt).generate(rows, 24, ignore_eos=True)


def test_verify_command_passes(art):
    """`mamba2-aot verify` on a hybrid artifact: compiled == live, every state leaf compared along
    its own batch axis (pos is [b])."""
    r = run_cli("verify", str(art.path), "--weights", str(art.ckpt), "--steps", "16", "--json", env=subprocess_env())
    assert r.returncode == 0, r.stdout + r.stderr
    report = last_json(r.stdout)
    assert report["ok"] and report["tokens_agree"] and report["cache_max_rel"] == 0.0
