"""Sharded artifacts: `export --devices N` (GSPMD tensor parallel) and the runtime's placement.

Multi-device runs happen in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=N
(the flag must be set before jax is imported); exports need no devices (an AbstractMesh) and
run in this process through the CLI command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from exporter.cli import export_command
from exporter.sharding import AXIS, fallback_summary, plan
from runtime.errors import ArtifactError, CompatibilityError
from runtime.format.manifest import read_manifest
from runtime.engine.placement import parse_spec

REPO = Path(__file__).resolve().parents[1]
DEVICES = (4, 8)
# Head count (16), vocab (128), conv channels (160) and in_proj rows (304) all divisible by 8.
TINY_HF = {
    "model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
    "state_size": 16, "head_dim": 8, "num_heads": 16, "expand": 2, "n_groups": 1, "chunk_size": 8,
    "conv_kernel": 4, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}
LIMITS = ["--max-batch", "4", "--max-prompt-tokens", "32", "--max-new-tokens", "16", "--max-stop-tokens", "2"]
# Ragged: one row past a chunk boundary, one single token, one in the next prompt bucket.
PROMPTS = [list(range(1, 12)), [5], [(7 * i) % 127 + 1 for i in range(20)]]
NEW_TOKENS, BLOCK = 12, 5  # three decode calls: the sharded state goes back in twice

# Runs in a fresh process that sees N devices: generate with random weights, then from an
# orbax checkpoint (restored straight into shards), and report what it saw.
_RUN = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import runtime.engine.weights
    from runtime.engine.model import load
    from runtime.engine.requests import pad_batch
    from runtime.engine.weights import parse_weight_spec
    from runtime.tools.random_init import random_weights
    from runtime.tools.writers import save_orbax

    artifact, orbax_dir, out, prompts, new, block = json.loads(sys.argv[1])
    m = load(artifact, "random")
    tokens = m.generate(prompts, new, block=block)
    padded, lengths = pad_batch(prompts, m.buckets, 0)
    logits = np.asarray(m.prefill(padded, lengths)[0])[: len(prompts)]
    total = sum(a.nbytes for a in m.params.values())
    per_device = sum(a.addressable_shards[0].data.nbytes for a in m.params.values())
    report = {"devices": jax.device_count(), "tokens": tokens, "logits": logits.tolist(),
              "per_device_bytes": per_device, "total_bytes": total,
              "param_specs": {k: [e for e in v.sharding.spec] for k, v in m.params.items()}}
    if orbax_dir:
        save_orbax(random_weights(parse_weight_spec(m.manifest.weights), 0), orbax_dir)
        host_reads = []
        real = runtime.engine.weights.load_weights
        runtime.engine.weights.load_weights = lambda *a, **k: host_reads.append(1) or real(*a, **k)
        m2 = load(artifact, orbax_dir)
        report["orbax_tokens"] = m2.generate(prompts, new, block=block)
        report["orbax_host_reads"] = len(host_reads)
        report["orbax_specs"] = {k: [e for e in v.sharding.spec] for k, v in m2.params.items()}
    with open(out, "w") as f:
        json.dump(report, f)
""")


def _env(devices: int | None, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MAMBA2_AOT_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
    env.pop("MAMBA2_AOT_DEBUG", None)
    if devices is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """Exports (CLI, in process) for 1, 4 and 8 devices, then runs the 4- and 8-device ones in
    subprocesses while this process computes the 1-device reference."""
    root = tmp_path_factory.mktemp("sharding")
    cfg_dir = root / "tp-tiny"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(TINY_HF))
    out: dict = {"root": root, "config": cfg_dir / "config.json", "cli": {}}
    for n in (1, *DEVICES):
        res = CliRunner().invoke(export_command, ["--model", str(cfg_dir), "--out", str(root / f"a{n}"),
                                                  "--devices", str(n), *LIMITS])
        assert res.exit_code == 0, (res.output, res.exception)
        out[n] = root / f"a{n}"
        out["cli"][n] = res.output
    procs = {}
    for n in DEVICES:
        args = [str(out[n]), str(root / f"orbax{n}") if n == 4 else "", str(root / f"run{n}.json"),
                PROMPTS, NEW_TOKENS, BLOCK]
        procs[n] = subprocess.Popen([sys.executable, "-c", _RUN, json.dumps(args)], env=_env(n, root / "xla"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        from runtime.engine.model import load
        from runtime.engine.requests import pad_batch

        ref = load(out[1], "random", use_compile_cache=False)  # leave this process's jax config alone
        padded, lengths = pad_batch(PROMPTS, ref.buckets, 0)
        out["ref_tokens"] = ref.generate(PROMPTS, NEW_TOKENS, block=BLOCK)
        out["ref_logits"] = np.asarray(ref.prefill(padded, lengths)[0])[: len(PROMPTS)]
        for n, p in procs.items():
            log, _ = p.communicate(timeout=300)
            assert p.returncode == 0, f"{n}-device run failed:\n{log[-3000:]}"
            out[f"run{n}"] = json.loads((root / f"run{n}.json").read_text())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.parametrize("n", DEVICES)
def test_same_greedy_tokens_as_one_device(artifacts, n):
    run = artifacts[f"run{n}"]
    assert run["devices"] == n
    assert run["tokens"] == artifacts["ref_tokens"]
    assert all(len(row) == NEW_TOKENS for row in run["tokens"])  # no stop ids: every row runs its budget
    np.testing.assert_allclose(np.asarray(run["logits"]), artifacts["ref_logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", DEVICES)
def test_weight_memory_per_device_is_about_one_nth(artifacts, n):
    run = artifacts[f"run{n}"]
    ratio = run["per_device_bytes"] / run["total_bytes"]
    assert 1 / n <= ratio < 1.5 / n, ratio
    manifest = read_manifest(artifacts[n])
    # The weights carry exactly the shardings the manifest records.
    for name, spec in manifest.mesh.weight_shardings.items():
        got = run["param_specs"][name]
        assert got + [None] * (len(spec) - len(got)) == spec, name


def test_orbax_checkpoint_is_restored_straight_into_shards(artifacts):
    run = artifacts["run4"]
    assert run["orbax_host_reads"] == 0  # never assembled on the host
    assert run["orbax_tokens"] == artifacts["ref_tokens"]
    assert run["orbax_specs"] == run["param_specs"]


def test_manifest_records_mesh_and_shardings(artifacts):
    assert read_manifest(artifacts[1]).mesh is None
    assert json.loads((artifacts[1] / "manifest.json").read_text())["mesh"] is None
    m = read_manifest(artifacts[4])
    assert m.mesh.axis_names == (AXIS,) and m.mesh.shape == (4,)
    w = m.mesh.weight_shardings
    assert set(w) == {t["name"] for t in m.weights["tensors"]}
    layer = "backbone.layers.1."
    expected = {
        "backbone.embeddings.weight": ["model", None],
        layer + "mixer.in_proj.weight": ["model", None],
        layer + "mixer.conv1d.weight": ["model", None, None],
        layer + "mixer.conv1d.bias": ["model"],
        layer + "mixer.dt_bias": ["model"], layer + "mixer.A_log": ["model"], layer + "mixer.D": ["model"],
        layer + "mixer.norm.weight": ["model"],
        layer + "mixer.out_proj.weight": [None, "model"],
        layer + "norm.weight": [None], "backbone.norm_f.weight": [None],
    }
    assert {k: w[k] for k in expected} == expected
    state = m.raw["mesh"]["cache_shardings"]  # every layer's leaves, split like layer 0's
    assert state["conv.0"] == [None, None, "model"] and state["ssm.0"] == [None, "model", None, None]
    assert all(v == state[k.split(".")[0] + ".0"] for k, v in state.items())
    for rel in m.files:
        assert jax.export.deserialize(bytearray((artifacts[4] / rel).read_bytes())).nr_devices == 4
    assert "tensor parallel over 4 devices (mesh model=4)" in artifacts["cli"][4]
    assert "replicated instead" not in artifacts["cli"][4]


def test_wrong_device_count_is_refused(artifacts):
    from runtime.engine.model import load

    have = jax.device_count()
    if have == 4:
        pytest.skip("this process sees 4 devices")
    with pytest.raises(CompatibilityError) as e:
        load(artifacts[4], "random", use_compile_cache=False)
    assert str(e.value) == (f"artifact was exported for 4 devices (mesh model=4) but this process sees {have}: "
                            f"run with 4 devices or re-export with --devices {have}")


def test_wrong_device_count_cli_one_line_error(artifacts):
    p = subprocess.run([sys.executable, "-c", "from runtime.tools.cli import main; main()", "generate",
                        str(artifacts[4]), "--weights", "random", "--prompt-ids", "1,2,3"],
                       env=_env(None, artifacts["root"] / "xla"), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == ["error: artifact was exported for 4 devices (mesh model=4) but this process sees 1: "
                     "run with 4 devices or re-export with --devices 1"], p.stderr


def test_indivisible_dims_fall_back_to_replicated():
    from exporter.config import Mamba2Config

    # vocab 128, intermediate 128, conv channels 160 divide by 32; in_proj rows 304 and 16 heads do not.
    cfg = Mamba2Config(hidden_size=64, num_hidden_layers=1, vocab_size=128, state_size=16, head_dim=8,
                       chunk_size=8)
    p = plan(cfg, 32)
    w = {k.replace("backbone.layers.0.", ""): v for k, v in p.weights.items()}
    assert w["backbone.embeddings.weight"] == (AXIS, None)
    assert w["mixer.conv1d.weight"] == (AXIS, None, None)
    assert w["mixer.out_proj.weight"] == (None, AXIS)
    assert w["mixer.in_proj.weight"] == (None, None)
    assert w["mixer.dt_bias"] == w["mixer.A_log"] == w["mixer.D"] == (None,)
    assert p.cache == {"conv.0": (None, None, AXIS), "ssm.0": (None,) * 4}
    assert p.manifest_record()["weight_shardings"]["backbone.layers.0.mixer.in_proj.weight"] == [None, None]
    summary = fallback_summary(p)
    assert "backbone.layers.*.mixer.in_proj.weight [304, 64]: dim 0 (304) is not divisible by 32" in summary
    assert "state.ssm.* [b, 16, 8, 16]: dim 1 (16) is not divisible by 32" in summary
    assert plan(cfg, 1).fallbacks == ()


def test_bad_partition_specs_are_artifact_errors():
    axes = ("model",)
    assert parse_spec(["model", None], axes, "w") == ("model", None)
    assert parse_spec([["model"], None], axes, "w") == (("model",), None)
    for bad in (["data"], "model", [1], ["model", "model"]):
        with pytest.raises(ArtifactError):
            parse_spec(bad, axes, "w")
    with pytest.raises(ArtifactError):
        parse_spec([None, None, "model"], axes, "w", rank=2)
