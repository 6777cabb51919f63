"""runtime.engine.weights: weight specs, checkpoint reading (safetensors, HF, orbax), strict loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from exporter.config import Mamba2Config
from exporter.params import param_shapes, weight_spec
from runtime.errors import ExportError, WeightsError
from runtime.engine.checkpoints import open_checkpoint
from runtime.engine.weights import (
    check_config,
    load_weights,
    parse_weight_spec,
    to_device,
)
from runtime.tools.random_init import random_weights
from runtime.tools.writers import save_orbax

BF16 = np.dtype(ml_dtypes.bfloat16)
CFG = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=96, state_size=16, head_dim=16, chunk_size=8)
UNTIED = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=96, state_size=16, head_dim=16,
                      chunk_size=8, tie_word_embeddings=False)
EMB = "backbone.embeddings.weight"
IN_PROJ = "backbone.layers.0.mixer.in_proj.weight"


@pytest.fixture(scope="module")
def spec():
    return parse_weight_spec(weight_spec(CFG))


def _arrays(cfg=CFG, seed=0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s.shape).astype(dtype) for n, s in param_shapes(cfg).items()}


def _save(tmp_path: Path, arrays, name="model.safetensors", config=None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(d / name))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def _err(fn, *a, **kw) -> str:
    with pytest.raises(WeightsError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- weight spec ------------------------------------------------------------------------------


def test_parse_spec_from_exporter(spec):
    shapes = param_shapes(CFG)
    assert spec.names() == list(shapes)
    for t in spec.tensors:
        assert t.shape == tuple(shapes[t.name].shape) and t.dtype == np.float32
    assert spec[EMB].sources == (EMB, "backbone.embedding.weight")
    assert spec.ignore == ("lm_head.weight",)
    assert spec.config_match["hidden_size"] == 64
    assert parse_weight_spec(spec.to_dict()) == spec
    bf = parse_weight_spec(weight_spec(CFG, "bfloat16"))
    assert all(t.dtype == BF16 for t in bf.tensors)


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.update(tensors=[]), "'tensors' must be a non-empty list"),
    (lambda s: s["tensors"][0].update(shape=[3, -1]), "'shape'"),
    (lambda s: s["tensors"][0].update(dtype="int32"), "not a floating-point type"),
    (lambda s: s["tensors"][0].update(dtype="float99"), "unknown dtype"),
    (lambda s: s["tensors"][0].pop("sources"), "needs 'sources'"),
    (lambda s: s["tensors"][0].update(init={"kind": "xavier"}), "'init'"),
    (lambda s: s["tensors"][0].update(init={"kind": "uniform", "low": 1, "high": 0}), "low 1.0 > high 0.0"),
    (lambda s: s["tensors"][1].update(name=s["tensors"][0]["name"]), "appears twice"),
    (lambda s: s["tensors"][1].update(sources=s["tensors"][0]["sources"]), "also a source of"),
    (lambda s: s["tensors"][0].update(sources=None, stack=["a", "b"]), "needs 'sources'"),  # never emitted
])
def test_parse_spec_rejects_malformed(mutate, needle):
    raw = json.loads(json.dumps(weight_spec(CFG)))
    mutate(raw)
    msg = _err(parse_weight_spec, raw)
    assert "invalid weight spec" in msg and needle in msg


# --- HF checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Real HF checkpoints: tied single-file, tied sharded, untied single-file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for tied in (True, False):
        hf_cfg = transformers.Mamba2Config(
            vocab_size=96, hidden_size=64, state_size=16, num_hidden_layers=2, head_dim=16, num_heads=8,
            n_groups=1, expand=2, chunk_size=8, tie_word_embeddings=tied)
        torch.manual_seed(0)
        model = transformers.Mamba2ForCausalLM(hf_cfg)
        key = "tied" if tied else "untied"
        model.save_pretrained(root / key)
        if tied:
            model.save_pretrained(root / "sharded", max_shard_size="20KB")
        out[key + "_state"] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        out[key] = root / key
    out["sharded"] = root / "sharded"
    return out


def test_hf_single_file(hf_dirs, spec):
    ckpt = open_checkpoint(hf_dirs["tied"])
    assert ckpt.config["hidden_size"] == 64 and "lm_head.weight" not in ckpt  # HF drops the tied duplicate
    params = load_weights(hf_dirs["tied"], spec)
    assert list(params) == spec.names()
    state = hf_dirs["tied_state"]
    for t in spec.tensors:
        assert params[t.name].shape == t.shape and params[t.name].dtype == np.float32
        np.testing.assert_array_equal(params[t.name], state[t.name])


def test_hf_sharded(hf_dirs, spec):
    index = json.loads((hf_dirs["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single = load_weights(hf_dirs["tied"], spec)
    sharded = load_weights(hf_dirs["sharded"], spec)
    via_index = load_weights(hf_dirs["sharded"] / "model.safetensors.index.json", spec)
    for name in spec.names():
        np.testing.assert_array_equal(sharded[name], single[name])
        np.testing.assert_array_equal(via_index[name], single[name])


def test_hf_untied_needs_lm_head(hf_dirs, tmp_path):
    untied = parse_weight_spec(weight_spec(UNTIED))
    params = load_weights(hf_dirs["untied"], untied)
    np.testing.assert_array_equal(params["lm_head.weight"], hf_dirs["untied_state"]["lm_head.weight"])
    # A tied checkpoint has no lm_head: the untied artifact refuses it (config first, then tensors).
    msg = _err(load_weights, hf_dirs["tied"], untied)
    assert "tie_word_embeddings true != false" in msg
    arrays = _arrays(CFG)
    msg = _err(load_weights, _save(tmp_path, arrays), untied)
    assert "missing lm_head.weight [96, 64]" in msg


def test_hf_config_inf_forms_accepted(hf_dirs, spec):
    # transformers 5 writes time_step_limit's inf as {"__float__": "Infinity"}; older ones as Infinity.
    cfg = json.loads((hf_dirs["tied"] / "config.json").read_text())
    assert cfg["time_step_limit"][1] in ({"__float__": "Infinity"}, float("inf"))
    check_config(cfg, {**weight_spec(CFG), "config_match": {"time_step_limit": [0.0, "Infinity"]}})
    check_config({"time_step_limit": [0, float("inf")]},
                 {**weight_spec(CFG), "config_match": {"time_step_limit": [0.0, "Infinity"]}})


# --- names, aliases, strictness -----------------------------------------------------------------


def test_mamba_ssm_alias_and_tied_lm_head(tmp_path, spec):
    arrays = _arrays()
    arrays["backbone.embedding.weight"] = arrays.pop(EMB)
    arrays["lm_head.weight"] = arrays["backbone.embedding.weight"].copy()  # stored tied duplicate: ignored
    params = load_weights(_save(tmp_path, arrays), spec)
    assert "lm_head.weight" not in params
    np.testing.assert_array_equal(params[EMB], arrays["backbone.embedding.weight"])


def test_both_alias_names_is_unexpected(tmp_path, spec):
    arrays = _arrays()
    arrays["backbone.embedding.weight"] = arrays[EMB]
    msg = _err(load_weights, _save(tmp_path, arrays), spec)
    assert "unexpected backbone.embedding.weight [96, 64] (an alias of backbone.embeddings.weight" in msg


def test_mismatch_messages(tmp_path, spec, monkeypatch):
    arrays = _arrays()
    del arrays[IN_PROJ]
    arrays["extra.weight"] = np.zeros((3, 4), np.float32)
    arrays["backbone.norm_f.weight"] = np.ones((65,), np.float32)
    arrays["backbone.layers.1.mixer.D"] = np.ones((8,), np.int64)
    d = _save(tmp_path, arrays)
    # Names, shapes and dtypes are checked from headers only: no tensor data is read.
    from runtime.engine.checkpoints import SafetensorsCheckpoint
    monkeypatch.setattr(SafetensorsCheckpoint, "read", lambda self, n: pytest.fail(f"read {n}"))
    msg = _err(load_weights, d, spec)
    assert msg.count(";") >= 3 and "4 problems:" in msg
    assert f"missing {IN_PROJ} [296, 64]" in msg
    assert "unexpected extra.weight [3, 4]" in msg
    assert "backbone.norm_f.weight has shape [65], expected [64]" in msg
    assert "backbone.layers.1.mixer.D has dtype int64, expected float32" in msg


def test_many_problems_are_truncated(tmp_path, spec):
    arrays = {f"junk.{i}": np.zeros((2,), np.float32) for i in range(3)}
    msg = _err(load_weights, _save(tmp_path, arrays), spec)
    n = len(spec.tensors) + 3
    assert f"{n} problems:" in msg and f"and {n - 5} more" in msg


def test_dtype_casts(tmp_path, spec):
    bf = {k: v.astype(BF16) for k, v in _arrays().items()}
    d = _save(tmp_path, bf)
    ckpt = open_checkpoint(d / "model.safetensors")
    assert ckpt.config is None and ckpt.dtype(EMB) == BF16
    raw = ckpt.read(EMB)
    assert raw.dtype == BF16 and raw.shape == (96, 64)
    np.testing.assert_array_equal(raw, bf[EMB])
    as32 = load_weights(d, spec)
    assert as32[EMB].dtype == np.float32
    np.testing.assert_array_equal(as32[EMB], bf[EMB].astype(np.float32))
    spec_bf = parse_weight_spec(weight_spec(CFG, "bfloat16"))
    f64 = _save(tmp_path / "f64", {k: v.astype(np.float64) for k, v in _arrays().items()})
    params = load_weights(f64, spec_bf)
    assert all(v.dtype == BF16 for v in params.values())


@pytest.mark.parametrize("bad, counts", [(np.nan, "(1 NaN, 0 Inf)"), (np.inf, "(0 NaN, 1 Inf)")])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_nonfinite_flagged(tmp_path, bad, counts, dtype):
    spec = parse_weight_spec(weight_spec(CFG, np.dtype(dtype).name))
    arrays = _arrays()
    arrays[IN_PROJ][3, 4] = bad
    arrays["backbone.norm_f.weight"][:2] = -np.inf
    d = _save(tmp_path, {k: v.astype(dtype) for k, v in arrays.items()})
    msg = _err(load_weights, d, spec)
    assert "2 problems" in msg and f"{IN_PROJ} has 1 non-finite values {counts}" in msg
    assert "backbone.norm_f.weight has 2 non-finite values (0 NaN, 2 Inf)" in msg
    assert np.isnan(load_weights(d, spec, check_finite=False)[IN_PROJ]).any() == np.isnan(bad)


def test_alias_sources_and_cast(tmp_path):
    """A tensor is read from the first of its source names present and cast to the spec's dtype."""
    raw = {"tensors": [
        {"name": "w", "shape": [2, 4], "dtype": "float32", "sources": ["w", "alt.w"],
         "init": {"kind": "normal", "std": 1.0}},
        {"name": "b", "shape": [4], "dtype": "bfloat16", "sources": ["b"], "init": {"kind": "constant", "value": 0}},
    ]}
    spec = parse_weight_spec(raw)
    params = load_weights(_save(tmp_path, {"alt.w": np.full((2, 4), 3, np.float32),
                                           "b": np.arange(4, dtype=np.float32)}), spec)
    np.testing.assert_array_equal(params["w"], np.full((2, 4), 3, np.float32))
    assert params["b"].dtype == BF16
    msg = _err(load_weights, _save(tmp_path / "nan", {"alt.w": np.full((2, 4), np.nan, np.float32),
                                                     "b": np.zeros(4, np.float32)}), spec)
    assert "alt.w (for w) has 8 non-finite values (8 NaN, 0 Inf)" in msg


# --- files that are not (whole) safetensors ------------------------------------------------------


def test_truncated_safetensors(tmp_path, spec):
    d = _save(tmp_path, _arrays())
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = _err(load_weights, d, spec)
    assert f"{f} is not a valid safetensors file (truncated?)" in msg
    f.write_bytes(b"garbage" * 10)
    assert "not a valid safetensors file" in _err(open_checkpoint, f)


def test_missing_path_and_pickles_refused(tmp_path):
    assert "no such file or directory" in _err(open_checkpoint, tmp_path / "nope")
    d = tmp_path / "pt"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (d / "config.json").write_text("{}")
    msg = _err(open_checkpoint, d)
    assert "pytorch_model.bin" in msg and "never loaded" in msg and "safetensors" in msg
    assert "never loaded" in _err(open_checkpoint, d / "pytorch_model.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no model.safetensors" in _err(open_checkpoint, empty)


def test_sharded_index_problems(tmp_path):
    d = _save(tmp_path, {"a": np.zeros(2, np.float32)}, name="model-00001-of-00001.safetensors")
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    assert "escapes the checkpoint directory" in _err(open_checkpoint, d)
    index.write_text(json.dumps({"weight_map": {"a": "/etc/passwd"}}))
    assert "escapes the checkpoint directory" in _err(open_checkpoint, d)
    index.write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    assert "missing from" in _err(open_checkpoint, d)
    index.write_text(json.dumps({"weight_map": {"b": "model-00001-of-00001.safetensors"}}))
    assert "does not contain it" in _err(open_checkpoint, d)
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert open_checkpoint(d).names() == ["a"]


# --- config check ------------------------------------------------------------------------------


def test_config_mismatch(tmp_path, spec):
    hf = {**CFG.to_dict(), "hidden_size": 1024, "num_hidden_layers": 48, "tie_word_embeddings": True,
          "time_step_limit": [0.0, float("inf")], "unrelated": "x"}
    del hf["vocab_size"]  # absent keys are not compared
    msg = _err(check_config, hf, spec)
    assert "checkpoint config differs from the artifact's: hidden_size 1024 != 64, num_hidden_layers 48 != 2" in msg
    assert "exported for another model" in msg
    d = _save(tmp_path, _arrays(), config=hf)
    assert "hidden_size 1024 != 64" in _err(load_weights, d, spec)
    # Infinity in config.json (as HF writes it) parses; matching numbers compare numerically.
    (d / "config.json").write_text('{"hidden_size": 64.0, "time_step_limit": [0.0, Infinity], "use_bias": false}')
    load_weights(d, spec)
    check_config(None, spec)
    # The runtime knows no model's conventions: a mamba_ssm config's unpadded vocabulary is
    # compared as it is (its converted checkpoint, exporter.convert, carries the padded one).
    assert "vocab_size 90 != 96" in _err(check_config, {"vocab_size": 90, "pad_vocab_size_multiple": 16}, spec)
    # transformers 5 spells inf {"__float__": "Infinity"}; compared as the float it stands for.
    limit = {**spec.to_dict(), "config_match": {"time_step_limit": [0.0, "Infinity"]}}
    check_config({"time_step_limit": [0.0, {"__float__": "Infinity"}]}, limit)
    check_config({"time_step_limit": [0, float("inf")]}, limit)
    assert "time_step_limit" in _err(check_config, {"time_step_limit": [0.0, {"__float__": "1.5"}]}, limit)


# --- random weights ------------------------------------------------------------------------------


def test_random_weights(spec):
    a, b, c = random_weights(spec, 0), random_weights(spec, 0), random_weights(spec, 1)
    assert list(a) == spec.names()
    for t in spec.tensors:
        assert a[t.name].shape == t.shape and a[t.name].dtype == np.float32
        np.testing.assert_array_equal(a[t.name], b[t.name])
        if t.init["kind"] == "constant":
            assert (a[t.name] == t.init["value"]).all()
            np.testing.assert_array_equal(a[t.name], c[t.name])
        else:
            assert not np.array_equal(a[t.name], c[t.name])
        if t.init["kind"] == "uniform":
            assert a[t.name].min() >= np.float32(t.init["low"]) and a[t.name].max() <= np.float32(t.init["high"])
    assert 0.015 < a[IN_PROJ].std() < 0.025 and (a["backbone.layers.0.mixer.D"] == 1).all()
    bf = random_weights(weight_spec(CFG, "bfloat16"), 0)
    assert all(v.dtype == BF16 for v in bf.values())
    np.testing.assert_array_equal(bf[IN_PROJ], a[IN_PROJ].astype(BF16))


def test_random_weights_same_in_another_process(spec):
    code = ("import hashlib, json, sys; from runtime.tools.random_init import random_weights; "
            "spec = json.loads(sys.stdin.read()); w = random_weights(spec, 7); "
            "print(hashlib.sha256(b''.join(w[n].tobytes() for n in sorted(w))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec.to_dict()), text=True,
                         capture_output=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""},
                         cwd=Path(__file__).resolve().parents[1])
    import hashlib
    w = random_weights(spec, 7)
    assert out.stdout.strip() == hashlib.sha256(b"".join(w[n].tobytes() for n in sorted(w))).hexdigest()


def test_random_weights_large_tensor_blocks():
    raw = {"tensors": [{"name": "big", "shape": [3, (1 << 22) // 2], "dtype": "float32", "sources": ["big"],
                        "init": {"kind": "normal", "std": 1.0}}]}
    w1, w2 = random_weights(raw, 3)["big"], random_weights(raw, 3)["big"]
    np.testing.assert_array_equal(w1, w2)
    assert abs(float(w1.std()) - 1.0) < 0.01


# --- orbax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(tmp_path, dtype):
    spec = parse_weight_spec(weight_spec(CFG, dtype))
    params = random_weights(spec, 5)
    out = tmp_path / "orbax"
    assert save_orbax(params, out, config=spec.config_match) == out.absolute()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".orbax.tmp", ".orbax.old"))]
    ckpt = open_checkpoint(out)
    assert sorted(ckpt.names()) == sorted(params) and ckpt.config == spec.config_match
    assert ckpt.shape(IN_PROJ) == (296, 64) and ckpt.dtype(IN_PROJ) == np.dtype(dtype)
    single = ckpt.read(IN_PROJ)
    assert isinstance(single, np.ndarray) and single.dtype == np.dtype(dtype)
    loaded = load_weights(out, spec)
    for name, v in params.items():
        assert loaded[name].dtype == v.dtype
        np.testing.assert_array_equal(loaded[name], v)
    with pytest.raises(ExportError, match="already exists"):
        save_orbax(params, out)
    other = random_weights(spec, 6)
    save_orbax(other, out, config=None, force=True)
    np.testing.assert_array_equal(load_weights(out, spec)[IN_PROJ], other[IN_PROJ])
    assert open_checkpoint(out).config is None


def _rss_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_safetensors_read_many_releases_pages(tmp_path):
    """A tensor's mapped pages leave the process once the next one is asked for (the loader
    copies each tensor: holding the whole mapped file beside the copies doubled peak RSS),
    and views handed out earlier still read the file's data."""
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((1024, 4096)).astype(np.float32) for i in range(4)}  # 16 MiB each
    d = _save(tmp_path, arrays)
    with open_checkpoint(d) as ckpt:
        before = _rss_file_mib()
        views, grew = {}, []
        for name, view in ckpt.read_many(sorted(arrays)):
            views[name] = view
            float(view.sum())  # touch every page
            grew.append(_rss_file_mib() - before)
        assert max(grew) < 40, grew  # without the release: 16, 32, 48, 64 MiB
        for name, v in arrays.items():  # released pages refault from the file
            np.testing.assert_array_equal(views[name], v)


def test_orbax_reads_in_batches(tmp_path, spec, monkeypatch):
    import runtime.engine.checkpoints as rw

    params = random_weights(spec, 1)
    save_orbax(params, tmp_path / "o")
    monkeypatch.setattr(rw, "_ORBAX_BATCH_BYTES", 40_000)  # several restores of a few tensors each
    loaded = load_weights(tmp_path / "o", spec)
    assert list(loaded) == spec.names()
    for name, v in params.items():
        np.testing.assert_array_equal(loaded[name], v)


def test_orbax_config_mismatch_detected(tmp_path, spec):
    params = random_weights(spec, 0)
    save_orbax(params, tmp_path / "o", config={**spec.config_match, "hidden_size": 128})
    assert "hidden_size 128 != 64" in _err(load_weights, tmp_path / "o", spec)


# --- device placement and import hygiene ----------------------------------------------------------


def test_to_device(spec):
    import jax

    params = random_weights(spec, 0)
    on = to_device(params)
    assert isinstance(on[IN_PROJ], jax.Array)
    np.testing.assert_array_equal(np.asarray(on[IN_PROJ]), params[IN_PROJ])
    dev = jax.devices()[0]
    on = to_device(params, {IN_PROJ: jax.sharding.SingleDeviceSharding(dev)})
    assert on[IN_PROJ].devices() == {dev}
    assert "not parameters" in _err(to_device, params, {"nope": None})


def test_runtime_weights_imports_no_model_code():
    code = ("import sys, runtime.engine.weights; "
            "bad = [m for m in ('exporter', 'flax', 'torch', 'tensorflow', 'orbax') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == ""
