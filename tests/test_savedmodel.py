"""The TF Serving SavedModel (exporter/savedmodel.py): runs with TensorFlow alone and gives the
runtime's tokens.

One tiny model is written once per module: as a SavedModel, and as a jax.export artifact plus a
.safetensors file with the same weights for the runtime. A subprocess that can import only
TensorFlow (jax, jaxlib, flax, exporter and runtime are import-blocked) loads the SavedModel,
reads its signatures and runs them; its results come back as an .npz file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exporter.config import Mamba2Config
from exporter.functions import Limits, ModelFunctions
from exporter.state import empty_state, stack_layers
from runtime.errors import ExportError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None,
    reason="tensorflow is not installed (pip install 'mamba2-aot[export]')")

CFG = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=96, state_size=16, head_dim=16,
                   chunk_size=8, name="tiny-sm")
LIMITS = Limits(max_batch=8, max_prompt_tokens=64, max_new_tokens=16, max_stop_tokens=4, decode_block=16)
NEW = 12  # < LIMITS.max_new_tokens: the -1 padding after each row's count is visible
PROMPT_LENS = (5, 16, 1, 11)  # ragged; the runtime buckets this batch to exactly [4, 16]
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.0)
SEED = 7
SUBSET = [0, 2, 3]  # prefill runs these rows at another shape ([3, 11]): the dims are polymorphic


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in PROMPT_LENS]


def _pad(prompts, t=None):
    t = t or max(map(len, prompts))
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


# The TensorFlow-only side: a script run in a fresh interpreter.
TF_SCRIPT = textwrap.dedent(r'''
    import importlib.abc, json, sys
    BLOCKED = ("jax", "jaxlib", "flax", "exporter", "runtime")
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"import of {name} blocked by the test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import tensorflow as tf

    req = json.loads(sys.stdin.read())
    model = tf.saved_model.load(req["path"])

    def spec(s):
        return {"shape": None if s.shape.rank is None else s.shape.as_list(), "dtype": s.dtype.name}

    sigs = {name: {"inputs": {k: spec(v) for k, v in fn.structured_input_signature[1].items()},
                   "outputs": {k: spec(v) for k, v in fn.structured_outputs.items()}}
            for name, fn in model.signatures.items()}

    out = {}
    def run(sig, prefix, **kw):
        res = model.signatures[sig](**{k: tf.constant(v, dtype=req["dtypes"][k]) for k, v in kw.items()})
        out.update({f"{prefix}/{k}": v.numpy() for k, v in res.items()})

    main = dict(tokens=req["tokens"], lengths=req["lengths"])
    run("generate", "generate", **main, max_new_tokens=req["new"])
    run("serving_default", "serving_default", **main, max_new_tokens=req["new"])
    run("sample", "sample", **main, max_new_tokens=req["new"], seed=req["seed"], **req["sampling"])
    run("sample", "sample_big_seed", **main, max_new_tokens=req["new"], seed=req["seed"] + 2**32,
        **req["sampling"])
    run("prefill", "prefill", tokens=req["sub_tokens"], lengths=req["sub_lengths"])
    # The padded tail holds out-of-vocabulary ids: masked, it changes nothing.
    dirty = [row[:n] + [req["vocab"]] * (len(row) - n) for row, n in zip(req["tokens"], req["lengths"])]
    run("generate", "dirty_generate", tokens=dirty, lengths=req["lengths"], max_new_tokens=req["new"])
    sub_dirty = [row[:n] + [req["vocab"]] * (len(row) - n) for row, n in zip(req["sub_tokens"], req["sub_lengths"])]
    run("prefill", "dirty_prefill", tokens=sub_dirty, lengths=req["sub_lengths"])

    errors = {}
    bad_token = [row[:] for row in req["tokens"]]
    bad_token[0][0] = 10**6
    for label, kw in {"token": dict(main, tokens=bad_token, max_new_tokens=req["new"]),
                      "budget": dict(main, max_new_tokens=0)}.items():
        try:
            run("generate", "bad", **kw)
            errors[label] = None
        except tf.errors.InvalidArgumentError as e:
            errors[label] = e.message

    np.savez(req["out"], **out)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
    try:
        import jax  # noqa: F401
        jax_importable = True
    except ImportError:
        jax_importable = False
    print(json.dumps({"signatures": sigs, "errors": errors, "leaked": leaked,
                      "jax_importable": jax_importable, "blocked_attempts": sorted(set(attempts))}))
''')


@dataclasses.dataclass
class Exported:
    cfg: Mamba2Config
    params: dict
    savedmodel: Path
    tf_out: dict  # the subprocess's JSON report
    tf_arrays: dict  # its outputs, "<signature>/<output>" -> array
    prompts: list


@pytest.fixture(scope="module")
def params(make_random_params) -> dict:
    return make_random_params(CFG, seed=0)


@pytest.fixture(scope="module")
def runtime_model(params, tmp_path_factory):
    """The jax.export artifact of the same functions, loaded by the runtime with the same weights.
    (Its functions do not depend on the eos id: the runtime takes stop ids per request.)"""
    from safetensors.numpy import save_file

    from exporter.artifact import write_artifact
    from runtime.engine.model import load

    tmp = tmp_path_factory.mktemp("artifact")
    write_artifact(ModelFunctions(CFG, jnp.float32, LIMITS), ("cpu",), tmp / "art", force=False)
    save_file({k: np.asarray(v) for k, v in params.items()}, str(tmp / "model.safetensors"))
    return load(tmp / "art", weights=tmp / "model.safetensors", use_compile_cache=False)


def _choose_eos(runtime_model, prompts) -> int:
    """A token row 0's greedy run emits at step 3, so stopping at eos is exercised."""
    return runtime_model.generate(prompts, NEW, ignore_eos=True)[0][3]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, params, runtime_model) -> Exported:
    pytest.importorskip("tensorflow", reason="tensorflow is not installed")
    from exporter.savedmodel import write_savedmodel

    tmp = tmp_path_factory.mktemp("savedmodel")
    prompts = _prompts()
    cfg = dataclasses.replace(CFG, eos_token_id=_choose_eos(runtime_model, prompts))
    steps = []
    path = write_savedmodel(cfg, params, tmp / "out", 1, jnp.float32, LIMITS, force=False,
                            progress=lambda step, s: steps.append(step))
    assert path == tmp / "out" / "1"
    assert steps == ["convert generate", "convert sample", "convert prefill", "save"]

    tokens, lengths = _pad(prompts, 16)
    sub_tokens, sub_lengths = _pad([prompts[i] for i in SUBSET])
    req = {
        "path": str(path), "out": str(tmp / "tf_out.npz"), "new": NEW, "seed": SEED,
        "tokens": tokens.tolist(), "lengths": lengths.tolist(),
        "sub_tokens": sub_tokens.tolist(), "sub_lengths": sub_lengths.tolist(),
        "sampling": SAMPLING, "vocab": CFG.vocab_size,
        "dtypes": {"tokens": "int32", "lengths": "int32", "max_new_tokens": "int32",
                   "temperature": "float32", "top_k": "int32", "top_p": "float32",
                   "min_p": "float32", "seed": "int64"},
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", TF_SCRIPT], input=json.dumps(req), env=env,
                          cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(tmp / "tf_out.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return Exported(cfg, params, path, report, arrays, prompts)


def _rows(tokens: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    return [tokens[i, : counts[i]].tolist() for i in range(len(counts))]


# -- (1) TensorFlow alone runs it ----------------------------------------------------------------

def test_runs_with_tensorflow_only(exported):
    report, a = exported.tf_out, exported.tf_arrays
    assert report["leaked"] == [] and not report["jax_importable"]
    tokens, counts = a["generate/tokens"], a["generate/counts"]
    assert tokens.shape == (len(PROMPT_LENS), LIMITS.max_new_tokens) and tokens.dtype == np.int32
    assert counts.tolist() == [int(c) for c in counts] and all(1 <= c <= NEW for c in counts)
    for row, c in zip(tokens, counts):
        assert (row[c:] == -1).all() and (row[:c] >= 0).all() and (row[:c] < CFG.vocab_size).all()
        assert c == NEW or row[c - 1] == exported.cfg.eos_token_id  # stops only at eos or budget
        assert exported.cfg.eos_token_id not in row[: c - 1].tolist()
    assert counts.min() < NEW, "eos never hit: stopping is not exercised"
    assert counts.max() > 4
    np.testing.assert_array_equal(a["serving_default/tokens"], tokens)  # serving_default = generate
    assert a["prefill/logits"].shape == (len(SUBSET), CFG.vocab_size)  # another batch and length


def test_padding_never_touches_anything(exported):
    a = exported.tf_arrays
    assert max(PROMPT_LENS) == 16 and min(PROMPT_LENS) < 16  # some rows have a padded tail
    for out in ("tokens", "counts"):
        np.testing.assert_array_equal(a[f"dirty_generate/{out}"], a[f"generate/{out}"])
    for out in ("logits", "cache_conv", "cache_ssm"):
        np.testing.assert_array_equal(a[f"dirty_prefill/{out}"], a[f"prefill/{out}"])


def test_bad_requests_are_rejected_in_the_graph(exported):
    errors = exported.tf_out["errors"]
    assert errors["token"] and f"token ids must be in [0, {CFG.vocab_size})" in errors["token"]
    assert errors["budget"] and "max_new_tokens must be in [1, 16]" in errors["budget"]


# -- (2) the same tokens as the jax.export artifact through the runtime --------------------------

def test_generate_matches_runtime(exported, runtime_model):
    a = exported.tf_arrays
    want = runtime_model.generate(exported.prompts, NEW, stop=[exported.cfg.eos_token_id], ignore_eos=True)
    assert _rows(a["generate/tokens"], a["generate/counts"]) == want


def test_sample_matches_runtime(exported, runtime_model):
    a = exported.tf_arrays
    want = runtime_model.generate(exported.prompts, NEW, seed=SEED, stop=[exported.cfg.eos_token_id], ignore_eos=True,
                                  **SAMPLING)
    got = _rows(a["sample/tokens"], a["sample/counts"])
    assert got == want
    assert got != _rows(a["generate/tokens"], a["generate/counts"])  # it really sampled
    # A seed beyond 32 bits is its own stream, the runtime's too.
    big = _rows(a["sample_big_seed/tokens"], a["sample_big_seed/counts"])
    assert big != got
    assert big == runtime_model.generate(exported.prompts, NEW, seed=SEED + 2**32, stop=[exported.cfg.eos_token_id],
                                         ignore_eos=True, **SAMPLING)


def test_prefill_matches_jax(exported):
    fns = ModelFunctions(exported.cfg, jnp.float32, LIMITS)
    tokens, lengths = _pad([exported.prompts[i] for i in SUBSET])  # [3, 11]
    logits, cache = jax.jit(fns.prefill)(exported.params, empty_state(CFG, 3), tokens, lengths)
    cache = stack_layers(cache)
    a = exported.tf_arrays
    for got, want in ((a["prefill/logits"], logits), (a["prefill/cache_conv"], cache["conv"]),
                      (a["prefill/cache_ssm"], cache["ssm"])):
        want = np.asarray(want)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0)


# -- (3) signatures ------------------------------------------------------------------------------

def test_signature_specs(exported):
    i32, f32 = "int32", "float32"
    L, V, N = CFG.num_hidden_layers, CFG.vocab_size, LIMITS.max_new_tokens
    io = lambda shape, dtype: {"shape": shape, "dtype": dtype}  # noqa: E731
    base = {"tokens": io([None, None], i32), "lengths": io([None], i32)}
    gen_in = {**base, "max_new_tokens": io([], i32)}
    gen_out = {"tokens": io([None, N], i32), "counts": io([None], i32)}
    want = {
        "serving_default": {"inputs": gen_in, "outputs": gen_out},
        "generate": {"inputs": gen_in, "outputs": gen_out},
        "sample": {"inputs": {**gen_in, "temperature": io([], f32), "top_k": io([], i32),
                              "top_p": io([], f32), "min_p": io([], f32), "seed": io([], "int64")},
                   "outputs": gen_out},
        "prefill": {"inputs": base, "outputs": {
            "logits": io([None, V], f32),
            "cache_conv": io([L, None, CFG.conv_kernel - 1, CFG.conv_dim], f32),
            "cache_ssm": io([L, None, CFG.num_heads, CFG.head_dim, CFG.state_size], f32)}},
    }
    assert exported.tf_out["signatures"] == want


def _dirs(parent: Path) -> list[str]:
    """Directories under a model base path (atomic_directory's `.<version>.lock` file may stay)."""
    return sorted(p.name for p in parent.iterdir() if p.is_dir())


# -- (4) weights live in variables/, not in the graph -------------------------------------------

def test_weights_are_variables(exported):
    path = exported.savedmodel
    assert _dirs(path.parent) == ["1"]  # no temp dirs left behind
    pb = (path / "saved_model.pb").read_bytes()
    data = b"".join(p.read_bytes() for p in sorted((path / "variables").glob("variables.data-*")))
    assert (path / "variables" / "variables.index").is_file()
    params = {k: np.asarray(v) for k, v in exported.params.items()}
    assert len(data) >= sum(v.nbytes for v in params.values())
    big = {k: v for k, v in params.items() if v.nbytes >= 1024}
    assert big
    for name, value in big.items():
        raw = np.ascontiguousarray(value).tobytes()
        assert raw in data, f"{name} is not in variables/"
        assert raw not in pb, f"{name} is a constant in saved_model.pb"
    # The graph does not grow with the weights (it holds StableHLO and signatures only).
    assert len(pb) < 2_000_000


# -- export_savedmodel: the CLI's helper --------------------------------------------------------

def _hf_config_dir(tmp: Path) -> Path:
    d = tmp / "tiny-hf"
    d.mkdir()
    keys = ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
            "n_groups", "chunk_size", "tie_word_embeddings", "head_dim", "num_heads",
            "bos_token_id", "eos_token_id", "pad_token_id", "use_bias", "use_conv_bias")
    hf = {"model_type": "mamba2", **{k: getattr(CFG, k) for k in keys}}
    (d / "config.json").write_text(json.dumps(hf))
    return d


def test_export_savedmodel_helper(tmp_path):
    pytest.importorskip("tensorflow", reason="tensorflow is not installed")
    from exporter.savedmodel import export_savedmodel

    model = str(_hf_config_dir(tmp_path))
    out = tmp_path / "serving"
    stale = out / "3"
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("old")

    with pytest.raises(ExportError, match="already exists"):
        export_savedmodel(model, "random", out, 3, force=False, echo=lambda s: None)
    with pytest.raises(ExportError, match="weights not found"):
        export_savedmodel(model, str(tmp_path / "nope.safetensors"), out, 4, force=False, echo=print)
    with pytest.raises(ExportError, match="version"):
        export_savedmodel(model, "random", out, -1, force=False, echo=print)
    with pytest.raises(ExportError, match="pass --weights CHECKPOINT, or --weights random"):
        export_savedmodel(model, None, out, 4, force=False, echo=print)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write"):
        export_savedmodel(model, "random", blocker / "sub", 1, force=False, echo=print,
                          limits=LIMITS)

    lines = []
    path = export_savedmodel(model, "random", out, 3, force=True, echo=lines.append, limits=LIMITS)
    assert path == out / "3"
    assert (path / "saved_model.pb").is_file() and not (path / "stale.txt").exists()
    assert any(line.startswith("warning: binding seeded random weights") for line in lines)
    assert lines[-1].startswith(f"wrote SavedModel {path}") and "signatures" in lines[-1]
    assert _dirs(out) == ["3"]
