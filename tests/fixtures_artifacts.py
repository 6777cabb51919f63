"""Shared helpers for test_export / test_sampling / test_runtime: one tiny exported artifact per
session, its spread random weights, an isolated XLA compile cache, and subprocess runners with
an import blocker.

Import the fixtures into a test module (`from fixtures_artifacts import tiny, aot_cache_env`).
Each test module then gets its own FixtureDef, so the artifact itself is cached at module level
here: it is exported once per session whichever files run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exporter.config import Mamba2Config
from exporter.functions import ModelFunctions
from exporter.state import empty_state
from runtime.engine.compile_cache import ENV_VAR as CACHE_ENV
from runtime.format.manifest import Limits

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

TINY_CFG = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=96, state_size=16, head_dim=16,
                        chunk_size=8, name="tiny96")
TINY_LIMITS = Limits(vocab_size=96, max_batch=8, max_prompt_tokens=64, max_new_tokens=32, max_stop_tokens=4,
                     decode_block=32)

# Prompts most tests share (lengths cross the chunk size of 8): the runtime pads them to batch 4,
# length 16, so one compilation per function serves the whole session (and, through the
# persistent cache, its subprocesses).
PROMPTS = [[5, 17, 3, 88, 41], [60, 2, 2, 9, 33, 71, 14, 50, 8, 19, 23], [1]]
FAST = {"xla_backend_optimization_level": 0}  # as conftest.FAST_COMPILE: same math, faster compile

# The packages a model-free runtime must never import.
HEAVY = ("exporter", "flax", "tensorflow", "torch")


# ---------------------------------------------------------------------------------------------
# Subprocesses


def blocker_prelude(blocked) -> str:
    """Python source that makes `blocked` top-level packages unimportable; put it first.

    A blocked package looks installed (importlib.util.find_spec finds it, as jax's cache code
    asks through etils) but importing it raises ImportError."""
    return textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, sys
        _BLOCKED = {sorted(set(blocked))!r}
        class _Refuse(importlib.abc.Loader):
            def create_module(self, spec):
                raise ImportError(f"blocked import of {{spec.name}}")
            def exec_module(self, module):
                raise ImportError(f"blocked import of {{module.__name__}}")
        class _Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in _BLOCKED:
                    return importlib.machinery.ModuleSpec(name, _Refuse())
        sys.meta_path.insert(0, _Blocker())
        def _leaked():
            return sorted({{m.split(".")[0] for m in sys.modules}} & set(_BLOCKED))
    """)


# Runs runtime.tools.cli.main(argv) behind the blocker, then reports blocked modules that got loaded.
def cli_wrapper(blocked) -> str:
    return blocker_prelude(blocked) + textwrap.dedent("""
        from runtime.tools.cli import main
        code = 0
        try:
            main(sys.argv[1:])
        except SystemExit as e:
            code = e.code
        print("LEAKED=" + ",".join(_leaked()), file=sys.stderr)
        sys.exit(code)
    """)


def subprocess_env(cache_dir: Path | None = None, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    env.pop("MAMBA2_AOT_DEBUG", None)
    if cache_dir is not None:
        env[CACHE_ENV] = str(cache_dir)
    env.update(extra)
    return env


def run_python(code: str, *args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def run_cli(*args: str, env: dict, blocked=(), timeout: float = 240) -> subprocess.CompletedProcess:
    """`mamba2-aot ARGS` in a fresh interpreter (behind an import blocker when `blocked`)."""
    if blocked:
        cmd = [sys.executable, "-c", cli_wrapper(blocked), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "runtime.tools.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))


def leaked(stderr: str) -> list[str]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("LEAKED=")][-1]
    return [m for m in line[len("LEAKED="):].split(",") if m]


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Flat pytrees <-> npz (never pickle)


def flatten(tree) -> dict[str, np.ndarray]:
    """{"0": arr, "1/conv": arr, ...} for a tuple of arrays and dicts of arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[key] = np.asarray(jax.device_get(leaf))
    return out


# The inverse of `flatten` for a tuple of arrays / dicts of arrays, as subprocess source.
UNFLATTEN_SRC = textwrap.dedent("""
    def unflatten(flat):
        args = {}
        for key in flat.files if hasattr(flat, "files") else flat:
            top, _, sub = key.partition("/")
            if sub:
                args.setdefault(int(top), {})[sub] = flat[key]
            else:
                args[int(top)] = flat[key]
        return tuple(args[i] for i in range(len(args)))
""")


# ---------------------------------------------------------------------------------------------
# The session's tiny artifact


@dataclasses.dataclass
class TinyArtifact:
    path: Path  # cpu artifact, float32, TINY_LIMITS
    fns: ModelFunctions
    params: dict  # {name: jax array}, spread random (clear logit margins, non-trivial sampling)
    weights: Path  # the same params as a .safetensors file
    cache_dir: Path  # the session's XLA compile cache (shared with subprocesses)

    @property
    def cfg(self) -> Mamba2Config:
        return self.fns.cfg

    @functools.cached_property
    def live_prefill(self) -> Callable:
        return jax.jit(self.fns.prefill)

    @functools.cached_property
    def live_decode(self) -> Callable:
        return jax.jit(self.fns.decode)

    @functools.cached_property
    def model(self):
        """The artifact loaded by the runtime with `weights` (one instance per session)."""
        from runtime.engine.model import load

        return load(self.path, self.weights)

    def live_generate(self, prompts, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                      seed=0, stop=None) -> list[list[int]]:
        """The jitted live functions on the batch the runtime would build: one decode call.
        `stop` is the whole stop list (the runtime adds eos unless ignore_eos)."""
        from runtime.engine.requests import RowSettings, check_stop_ids, pad_batch
        from runtime.engine.rng import row_keys

        from runtime.format.manifest import read_manifest

        limits = self.fns.limits.to_dict()
        buckets = dataclasses.asdict(read_manifest(self.path).buckets)  # pad as the runtime does
        n = len(prompts)
        tokens, lengths = pad_batch([list(p) for p in prompts], buckets)
        B = tokens.shape[0]
        keys = np.zeros((B, 2), np.uint32)
        keys[:n] = row_keys(seed, n)
        s = RowSettings.build(n, temperature, top_k, top_p, min_p).padded(B)
        logits, state = self.live_prefill(self.params, empty_state(self.cfg, B), tokens, lengths)
        out, counts, *_ = self.live_decode(
            self.params, state, logits, np.arange(B) >= n, np.full((B,), max_new_tokens, np.int32),
            np.zeros((B,), np.int32), keys, s.temperature, s.top_k, s.top_p, s.min_p,
            np.tile(check_stop_ids(stop, limits), (B, 1)))
        out, counts = np.asarray(out), np.asarray(counts)
        return [out[i, :counts[i]].tolist() for i in range(n)]


_BUILT: dict[str, object] = {}


def aot_cache_dir(tmp_path_factory) -> Path:
    if "cache" not in _BUILT:
        _BUILT["cache"] = tmp_path_factory.mktemp("xla-cache")
    return _BUILT["cache"]


def build_tiny(tmp_path_factory, make_random_params) -> TinyArtifact:
    if "tiny" not in _BUILT:
        from safetensors.numpy import save_file

        from exporter.artifact import write_artifact

        root = tmp_path_factory.mktemp("tiny-artifact")
        fns = ModelFunctions(TINY_CFG, jnp.float32, TINY_LIMITS)
        write_artifact(fns, ["cpu"], root / "art", force=False)
        params = make_random_params(TINY_CFG, seed=0, std=0.2)
        weights = root / "weights.safetensors"
        save_file({k: np.asarray(v) for k, v in params.items()}, str(weights))
        _BUILT["tiny"] = TinyArtifact(root / "art", fns, params, weights, aot_cache_dir(tmp_path_factory))
    return _BUILT["tiny"]


@pytest.fixture(scope="module")
def aot_cache_env(tmp_path_factory):
    """MAMBA2_AOT_CACHE_DIR -> the session's temp cache while the module runs (never ~/.cache)."""
    path = aot_cache_dir(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_random_params, aot_cache_env) -> TinyArtifact:
    return build_tiny(tmp_path_factory, make_random_params)


def step_by_step(model, prompts, steps, *, seed=0, stop=None, **sampling):
    """Drive the artifact's decode one token per call: (tokens [n, steps], the logits each token
    was drawn from [n, steps, V]). Rows that stopped get -1 from then on."""
    from runtime.engine.requests import SamplingParams, check_stop_ids, pad_batch
    from runtime.engine.rng import row_keys

    n = len(prompts)
    tokens, lengths = pad_batch([list(p) for p in prompts], model.buckets)
    B = tokens.shape[0]
    keys = np.zeros((B, 2), np.uint32)
    keys[:n] = row_keys(seed, n)
    finished = np.arange(B) >= n
    params = SamplingParams(**sampling)
    params.check()
    stop_ids = check_stop_ids(stop, model.limits)
    logits, state = model.prefill(tokens, lengths)
    toks = np.full((n, steps), -1, np.int64)
    seen = np.zeros((n, steps, logits.shape[-1]), np.float32)
    for i in range(steps):
        seen[:, i] = np.asarray(logits)[:n]
        out, counts, state, logits, fin = model.decode(state, logits, finished, 1, i, keys, params, stop_ids)
        out, counts = np.asarray(out), np.asarray(counts)
        for r in range(n):
            if counts[r]:
                toks[r, i] = out[r, 0]
        finished = np.asarray(fin)
    return toks, seen
