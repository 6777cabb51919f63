"""Write a compatibility fixture of this version's artifact format (`tests/fixtures/tiny-cpu-v2/`).

    .venv/bin/python scripts/make_fixture.py [--out tests/fixtures/tiny-cpu-v2]

Fixtures of earlier formats (tiny-cpu-v1: schema 1, made by 0.1.0) are kept as they were made,
never regenerated: later versions must keep loading them.

It holds what this version of mamba2-aot produces for a tiny model, so that later versions can
check they still load it (or refuse it with a clear message):

    artifact/        a cpu, float32 artifact (manifest.json + cpu/{prefill,decode}.jaxexport)
    weights/         model.safetensors (seeded, spread weights) + an HF-style config.json
    expected.json    the prompts, and the greedy tokens this version generates for them

The expected tokens come from the artifact through the runtime (`runtime.load(...).generate`)
and are cross-checked against the live JAX model (teacher-forced `forward`), whose logit
margins are recorded too: the smallest gap between the best and second-best logit.

Only the artifact's `created` time, expiry date and producer versions change from one run to
the next; the weights are byte-identical for a given numpy (tests/test_fixture_compat.py checks
that `make_weights` still reproduces them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tiny-cpu-v2"

# Tiny on purpose: the whole fixture is ~150 kB. Mamba2Config keyword arguments (and the name:
# the output directory's).
CONFIG = dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=16, head_dim=16,
              chunk_size=8)
LIMITS = dict(max_batch=2, max_prompt_tokens=16, max_new_tokens=8, max_stop_tokens=2, decode_block=8)
SEED = 1234
# A ragged batch: the first prompt crosses the chunk size (8), the second does not.
PROMPTS = [[5, 17, 3, 40, 41, 9, 22, 60, 2, 33, 11], [7, 1, 30]]
MAX_NEW_TOKENS = 8


def make_weights(spec: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded float32 weights for the manifest's weight spec, spread for clear logit margins.

    Needs numpy only: each tensor is drawn from its own stream keyed by (seed, tensor index).
    """
    out = {}
    for i, t in enumerate(spec["tensors"]):
        rng = np.random.default_rng([seed, i])
        name, shape = t["name"], tuple(t["shape"])
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":  # A in [1, 16]
            v = np.log(rng.uniform(1.0, 16.0, shape))
        elif leaf == "dt_bias":  # softplus^-1 of dt in [1e-3, 0.1]
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(0.1), shape))
            v = dt + np.log(-np.expm1(-dt))
        elif leaf == "D":
            v = rng.uniform(0.5, 1.5, shape)
        elif "norm" in name and leaf == "weight":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "conv1d" in name and leaf == "weight":
            v = rng.uniform(-0.5, 0.5, shape)
        elif leaf == "bias":
            v = 0.1 * rng.standard_normal(shape)
        else:
            v = 0.3 * rng.standard_normal(shape)
        out[name] = np.ascontiguousarray(v, dtype=np.float32)
    return out


def hf_config(cfg) -> dict:
    """An HF Mamba2 config.json for `cfg` (what the runtime checks weights against)."""
    d = cfg.to_dict()
    d.pop("name")
    return {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], **d}


def build(out: Path) -> dict:
    """Write the whole fixture under `out` (replaced); returns expected.json's content."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    import runtime
    from exporter.artifact import write_artifact
    from exporter.config import Mamba2Config
    from exporter.functions import Limits, ModelFunctions
    from exporter.params import bind

    cfg = Mamba2Config(**CONFIG, name=out.name)
    os.environ.setdefault("MAMBA2_AOT_CACHE_DIR", tempfile.mkdtemp(prefix="mamba2-aot-cache-"))
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / out.name
        stage.mkdir()
        manifest = write_artifact(ModelFunctions(cfg, jnp.float32, Limits(**LIMITS)), ("cpu",),
                                  stage / "artifact", force=False)
        for leftover in stage.glob(".*"):  # atomic_directory's lock file beside the artifact
            leftover.unlink()
        weights = make_weights(manifest["weights"])
        (stage / "weights").mkdir()
        save_file(weights, str(stage / "weights" / "model.safetensors"), metadata={"format": "pt"})
        (stage / "weights" / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")

        model = runtime.load(stage / "artifact", stage / "weights")
        tokens = model.generate(PROMPTS, MAX_NEW_TOKENS, stop=[], ignore_eos=True)

        # Cross-check against the live model: teacher-forced logits pick the same tokens.
        live = bind(cfg, {k: jnp.asarray(v) for k, v in weights.items()})
        margin = math.inf
        for prompt, new in zip(PROMPTS, tokens):
            seq = jnp.asarray([prompt + new[:-1]], jnp.int32)
            logits = np.asarray(live.forward(seq)[0])[0, len(prompt) - 1:]  # [new, V]
            top2 = np.sort(logits, axis=-1)[:, -2:]
            if np.argmax(logits, -1).tolist() != new:
                sys.exit(f"runtime tokens {new} differ from the live model's {np.argmax(logits, -1).tolist()}")
            margin = min(margin, float((top2[:, 1] - top2[:, 0]).min()))
        expected = {
            "prompts": PROMPTS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop": [],
            "ignore_eos": True,
            "sampling": "greedy",
            "tokens": tokens,
            "min_logit_margin": round(margin, 4),
            "made_with": {"mamba2-aot": runtime.__version__, "jax": jax.__version__},
        }
        lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in expected.items())
        (stage / "expected.json").write_text("{\n" + lines + "\n}\n")
        (stage / "README.md").write_text(
            "Compatibility fixture written by `scripts/make_fixture.py` (do not edit by hand).\n"
            "tests/test_fixture_compat.py loads it with the current runtime: it must keep producing\n"
            "`expected.json`'s tokens, or be refused with a clear CompatibilityError.\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, out)
    return expected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"[default: {DEFAULT_OUT}]")
    args = parser.parse_args(argv)
    expected = build(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e3:.1f} kB): tokens {expected['tokens']}, "
          f"min logit margin {expected['min_logit_margin']}")


if __name__ == "__main__":
    main()
