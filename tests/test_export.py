"""`mamba2-aot export`: artifacts that run without model code and match the live functions.

The tiny artifact (tests/fixtures_artifacts.py) is exported once per session; its outputs are
compared bit for bit with `jax.jit(fns.prefill)` / `jax.jit(fns.decode)` on the same inputs and
params (both sides compile the same HLO for the same shapes on this CPU).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime.tools.cli
from exporter.artifact import write_artifact
from exporter.config import PRESETS
from exporter.functions import ModelFunctions
from exporter.params import count_params
from exporter.state import empty_state
from fixtures_artifacts import (FAST, PROMPTS, TINY_LIMITS, UNFLATTEN_SRC, aot_cache_env,  # noqa: F401
                                blocker_prelude, flatten, last_json, run_cli, run_python, subprocess_env,
                                tiny)
from runtime.format.manifest import Limits, read_manifest
from runtime.engine.requests import SamplingParams, pad_batch
from runtime.engine.rng import row_keys
from runtime.format.weightspec import parse_weight_spec

V = 96
NO_STOP = np.full((TINY_LIMITS.max_stop_tokens,), -1, np.int32)


def decode_args(cache, logits, *, budget, keys, finished=None, temperature=0.0, top_k=0, top_p=1.0,
                min_p=0.0, stop=NO_STOP, start=0):
    """decode's arguments after params; every control given once for all rows (or per row)."""
    b = logits.shape[0]
    rows = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (b,)).copy()  # noqa: E731
    finished = np.zeros((b,), bool) if finished is None else np.asarray(finished, bool)
    stop = np.asarray(stop, np.int32)
    return (cache, logits, finished, rows(budget, np.int32), rows(start, np.int32), np.asarray(keys, np.uint32),
            rows(temperature, np.float32), rows(top_k, np.int32), rows(top_p, np.float32),
            rows(min_p, np.float32), np.broadcast_to(stop, (b, stop.shape[-1])).copy())


def assert_trees_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), f"{k}: max |diff| {np.abs(a[k].astype(np.float64) - b[k]).max()}"


def deserialize(artifact: Path, name: str, platform: str = "cpu") -> jax.export.Exported:
    return jax.export.deserialize(bytearray((artifact / platform / f"{name}.jaxexport").read_bytes()))


# ------------------------------------------------------------------ bit-exact without model code

# Runs every case of `io/*_in.npz` through the deserialized artifact, with exporter and flax
# unimportable, and writes `io/*_out.npz`.
_RUN_EXPORTED = blocker_prelude(("exporter", "flax")) + UNFLATTEN_SRC + """
import json
from pathlib import Path
import jax
import numpy as np
from safetensors.numpy import load_file

art, params_file, io = (Path(a) for a in sys.argv[1:4])
params = load_file(str(params_file))
fns = {}
for case in sorted(io.glob("*_in.npz")):
    name = case.name[: -len("_in.npz")]
    fn = name.split("-")[0]
    if fn not in fns:
        fns[fn] = jax.jit(jax.export.deserialize(bytearray((art / "cpu" / f"{fn}.jaxexport").read_bytes())).call)
    with np.load(case, allow_pickle=False) as f:
        args = unflatten(f)
    out = fns[fn](params, *args)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[key] = np.asarray(leaf)
    np.savez(io / f"{name}_out.npz", **flat)
print(json.dumps({"leaked": _leaked(), "cases": len(list(io.glob("*_out.npz")))}))
"""


def test_exported_bit_exact_in_fresh_process_without_model_code(tiny, tmp_path):
    # Batch 4, length 16: the shapes the runtime uses for PROMPTS (compiled once per session).
    tokens = np.random.default_rng(3).integers(0, V, (4, 16)).astype(np.int32)
    lengths = np.array([16, 9, 1, 4], np.int32)
    fresh = empty_state(tiny.cfg, 4)
    logits, cache = tiny.live_prefill(tiny.params, fresh, tokens, lengths)
    keys = row_keys(11, 4)
    cases = {
        "prefill": (fresh, tokens, lengths),
        "prefill-continued": (cache, tokens[:, ::-1].copy(), lengths[::-1].copy()),
        "decode-greedy": decode_args(cache, logits, budget=12, keys=keys),
        "decode-sampled": decode_args(cache, logits, budget=12, keys=keys, temperature=0.9, top_k=20,
                                      top_p=0.95, min_p=0.02),
    }
    live = {}
    for name, args in cases.items():
        np.savez(tmp_path / f"{name}_in.npz", **flatten(args))
        fn = tiny.live_prefill if name.startswith("prefill") else tiny.live_decode
        live[name] = flatten(fn(tiny.params, *args))

    r = run_python(_RUN_EXPORTED, tiny.path, tiny.weights, tmp_path, env=subprocess_env(tiny.cache_dir))
    assert r.returncode == 0, r.stderr
    report = last_json(r.stdout)
    assert report == {"leaked": [], "cases": 4}
    for name, want in live.items():
        with np.load(tmp_path / f"{name}_out.npz", allow_pickle=False) as f:
            got = {k: f[k] for k in f.files}
        assert_trees_equal(got, want)
    # The decode outputs are (tokens, counts, cache, logits, finished), each bit-exact.
    assert set(live["decode-sampled"]) == {"0", "1", "3", "4"} | {f"2/{k}.{i}" for k in ("conv", "ssm") for i in range(2)}
    assert not np.array_equal(live["decode-sampled"]["0"], live["decode-greedy"]["0"])


# ------------------------------------------------------------------ symbolic shapes


def test_one_artifact_serves_many_batch_sizes_and_prompt_lengths(tiny):
    manifest = json.loads((tiny.path / "manifest.json").read_text())
    sig = {fn: {t["name"]: t["shape"] for t in manifest["functions"][fn][io]}
           for fn in ("prefill", "decode") for io in ("inputs",)}
    assert sig["prefill"]["tokens"] == ["b", "t"] and sig["prefill"]["lengths"] == ["b"]
    assert sig["decode"]["logits"] == ["b", V] and sig["decode"]["keys"] == ["b", 2]
    outs = {t["name"]: t["shape"] for t in manifest["functions"]["decode"]["outputs"]}
    assert outs["tokens"] == ["b", TINY_LIMITS.decode_block] and outs["state/ssm.1"][0] == "b"
    assert sig["prefill"]["state/ssm.0"] == ["b", 8, 16, 16] and sig["prefill"]["state/conv.1"] == ["b", 3, 160]
    assert manifest["semantics_version"] == 2

    prefill, decode = deserialize(tiny.path, "prefill"), deserialize(tiny.path, "decode")
    assert [str(d) for d in prefill.in_avals[-2].shape] == ["b", "t"]  # tokens
    assert str(decode.out_avals[0].shape[0]) == "b"
    # Both sides compile with the same fast options (this test is about shapes, not compilers).
    prefill, decode = jax.jit(prefill.call, compiler_options=FAST), jax.jit(decode.call, compiler_options=FAST)
    live_prefill = jax.jit(tiny.fns.prefill, compiler_options=FAST)
    live_decode = jax.jit(tiny.fns.decode, compiler_options=FAST)

    rng = np.random.default_rng(0)
    caches = {}
    # Every b in {1, 3, 8} and every t in {1, 5, 17, 64} (17 crosses two chunk boundaries).
    for b, t in [(1, 5), (3, 17), (8, 64), (8, 1)]:
        tokens = rng.integers(0, V, (b, t)).astype(np.int32)
        lengths = rng.integers(1, t + 1, b).astype(np.int32)
        lengths[0] = t
        fresh = empty_state(tiny.cfg, b)
        got = flatten(prefill(tiny.params, fresh, tokens, lengths))
        want = flatten(live_prefill(tiny.params, fresh, tokens, lengths))
        assert_trees_equal(got, want)
        assert got["0"].shape == (b, V) and got["1/ssm.0"].shape[0] == b
        caches[b] = want
    for b, flat in sorted(caches.items()):
        args = decode_args({k[2:]: v for k, v in flat.items() if k.startswith("1/")}, flat["0"], budget=9,
                           keys=row_keys(b, b), temperature=1.0, top_k=30)
        got, want = flatten(decode(tiny.params, *args)), flatten(live_decode(tiny.params, *args))
        assert_trees_equal(got, want)
        assert got["0"].shape == (b, TINY_LIMITS.decode_block) and (got["1"] == 9).all()


# ------------------------------------------------------------------ early stop inside the loop


def _first_new(row, k_min, avoid):
    """(k, token): the first step >= k_min whose token is new in `row` and not in `avoid`."""
    for k in range(k_min, len(row)):
        if row[k] not in row[:k] and row[k] not in avoid:
            return k, int(row[k])
    pytest.skip("greedy path too repetitive to pick a stop token")


def test_stop_token_ends_rows_and_the_loop(tiny):
    model = tiny.model
    # Two prompts in the session's usual (4, 16) shapes: rows 2 and 3 are padding, finished.
    tokens, lengths = pad_batch(PROMPTS[:2] + [[0], [0]], model.buckets)
    lengths[2:] = 0
    B, cap = tokens.shape[0], TINY_LIMITS.decode_block
    assert tokens.shape == (4, 16)
    keys = np.zeros((B, 2), np.uint32)
    fin0 = np.arange(B) >= 2  # padding rows are finished from the start
    logits, state = model.prefill(tokens, lengths)

    def run(stop, budget=cap):
        budget = np.resize(np.asarray(budget, np.int32), B)
        out, counts, st, lg, fin = model.decode(
            state, logits, fin0, budget, 0, keys, SamplingParams(), np.array(stop + [-1] * (4 - len(stop)), np.int32))
        return np.asarray(out)[:2], np.asarray(counts)[:2], flatten(st), np.asarray(lg)[:2], np.asarray(fin)[:2]

    free, free_counts, free_cache, _, free_fin = run([])
    assert free_counts.tolist() == [cap, cap] and free_fin.tolist() == [False, False]
    row0, row1 = free[0].tolist(), free[1].tolist()

    # One row stops at step k (stop token included, zeros after); the other keeps going.
    k0, s0 = _first_new(row0, 2, avoid=row1)
    out, counts, _, _, fin = run([s0])
    assert counts.tolist() == [k0 + 1, cap] and fin.tolist() == [True, False]
    assert out[0, : k0 + 1].tolist() == row0[: k0 + 1] and not out[0, k0 + 1:].any()
    assert out[1].tolist() == row1

    # Both rows stop: the loop exits after max(k0, k1) + 1 steps, not `budget`. A stopped row is
    # frozen: its state and logits are bit for bit those of a run whose per-row budget ends it
    # at the same token (k_i + 1 steps each).
    k1, s1 = _first_new(row1, 1, avoid=row0[: k0 + 1])
    out, counts, cache, lg, fin = run([s0, s1])
    assert counts.tolist() == [k0 + 1, k1 + 1] and fin.tolist() == [True, True]
    assert out[1, : k1 + 1].tolist() == row1[: k1 + 1] and not out[1, k1 + 1:].any()
    assert max(k0, k1) + 1 < cap
    _, short_counts, short_cache, short_lg, short_fin = run([], budget=[k0 + 1, k1 + 1, 0, 0])
    assert short_counts.tolist() == [k0 + 1, k1 + 1] and short_fin.tolist() == [False, False]
    assert_trees_equal({k: v[:2] for k, v in cache.items()}, {k: v[:2] for k, v in short_cache.items()})
    assert np.array_equal(lg, short_lg)
    assert not np.array_equal(cache["ssm.0"], free_cache["ssm.0"])  # the full run went further


# ------------------------------------------------------------------ presets for accelerators


@pytest.mark.slow
def test_all_presets_lower_for_tpu_and_cuda(tmp_path):
    """Lowering only (no accelerator here): small files, both platforms, the right weight spec."""
    t0 = time.perf_counter()
    for name, cfg in PRESETS.items():
        out = tmp_path / name
        with warnings.catch_warnings():  # flattening must succeed for every module (exporter.flatten)
            warnings.simplefilter("error", RuntimeWarning)
            manifest = write_artifact(ModelFunctions(cfg, jnp.bfloat16, Limits(vocab_size=cfg.vocab_size)),
                                      ["tpu", "cuda"], out, force=False)
        n_params = count_params(cfg)
        param_bytes = 2 * n_params  # bfloat16
        assert manifest["platforms"] == ["tpu", "cuda"] and manifest["dtype"] == "bfloat16"
        parsed = read_manifest(out)
        assert parsed.platforms == ("tpu", "cuda")
        for fn in ("prefill", "decode"):
            assert set(parsed.functions[fn].files) == {"tpu", "cuda"}
        assert sorted(manifest["files"]) == sorted(f"{p}/{fn}.jaxexport" for p in ("tpu", "cuda")
                                                   for fn in ("prefill", "decode"))
        for rel, rec in manifest["files"].items():
            size = (out / rel).stat().st_size
            assert size == rec["bytes"]
            # No embedded weights: a few hundred kB, against 0.26 GB (130m) to 5.4 GB (2.7b).
            assert size < 3_000_000 and size < param_bytes / 100, (name, rel, size)
            exported = jax.export.deserialize(bytearray((out / rel).read_bytes()))
            assert exported.platforms == (rel.split("/")[0],)
        spec = parse_weight_spec(manifest["weights"])
        assert spec.num_params == n_params
        assert {np.dtype(t.dtype).name for t in spec.tensors} == {"bfloat16"}
        assert manifest["model"]["config"]["hidden_size"] == cfg.hidden_size
    print(f"\nexported 5 presets x (tpu, cuda) x (prefill, decode) in {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------ the export command


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        runtime.tools.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_export_command(tiny_hf, tmp_path, capsys, aot_cache_env):
    ckpt, out = tiny_hf.path, tmp_path / "art"
    small = ["--max-batch", "2", "--max-prompt-tokens", "32", "--max-new-tokens", "16"]

    # The real console entry point, in its own process: progress per platform/function + summary.
    r = run_cli("export", "--model", ckpt, "--platform", "cpu", "--out", out, *small,
                env=subprocess_env(aot_cache_env))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"exporting {ckpt.name} (2 layers, d_model 64) as float32 for cpu")
    assert any(ln.strip().startswith("[cpu] prefill") and "kB" in ln for ln in lines)
    assert any(ln.strip().startswith("[cpu] decode") and "kB" in ln for ln in lines)
    assert lines[-1].startswith("wrote 2 files + manifest.json") and str(out) in lines[-1]
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert json.loads(manifest_bytes)["limits"]["max_new_tokens"] == 16

    # Again without --force: one-line error, exit 2, the artifact untouched.
    code, stdout, err = run_main(capsys, "export", "--model", ckpt, "--out", out, *small)
    assert code == 2
    assert "already exists" in _one_line_error(err) and "--force" in err
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    read_manifest(out)

    # --force replaces it.
    code, stdout, err = run_main(capsys, "export", "--model", ckpt, "--out", out, "--force",
                                 "--max-new-tokens", "24")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["limits"]["max_new_tokens"] == 24
    assert sorted(p.name for p in out.iterdir()) == ["cpu", "manifest.json"]

    # An unknown model name lists the valid ones.
    code, _, err = run_main(capsys, "export", "--model", "nonsense", "--out", tmp_path / "x")
    line = _one_line_error(err)
    assert code == 2 and "nonsense" in line and all(p in line for p in PRESETS)
    assert not (tmp_path / "x").exists()

    # tpu lowers on this CPU-only machine (bfloat16 by default).
    code, stdout, err = run_main(capsys, "export", "--model", ckpt, "--platform", "tpu", "--out",
                                 tmp_path / "tpu", *small)
    assert code == 0, err
    assert "[tpu] prefill" in stdout and "[tpu] decode" in stdout
    m = read_manifest(tmp_path / "tpu")
    assert m.platforms == ("tpu",) and m.dtype == "bfloat16"

    # cpu + tpu default to different dtypes: a clear error unless --dtype says which.
    code, _, err = run_main(capsys, "export", "--model", ckpt, "--platform", "cpu", "--platform", "tpu",
                            "--out", tmp_path / "mixed", *small)
    assert code == 2 and "--dtype" in _one_line_error(err)
    assert not (tmp_path / "mixed").exists()
    code, stdout, err = run_main(capsys, "export", "--model", ckpt, "--platform", "cpu", "--platform", "tpu",
                                 "--dtype", "float32", "--out", tmp_path / "mixed", *small)
    assert code == 0, err
    m = read_manifest(tmp_path / "mixed")
    assert m.platforms == ("cpu", "tpu") and m.dtype == "float32" and len(m.files) == 4

    # inspect shows the model and both platforms.
    code, stdout, err = run_main(capsys, "inspect", tmp_path / "mixed")
    assert code == 0, err
    rows = dict((ln.split(None, 1) + [""])[:2] for ln in stdout.splitlines() if ln and not ln.startswith(" "))
    assert rows["model"].strip() == ckpt.name
    assert rows["platforms"].strip() == "cpu, tpu" and rows["dtype"].strip() == "float32"
    assert "hidden_size" in stdout and "cpu/prefill.jaxexport" in stdout and "tpu/decode.jaxexport" in stdout
