"""What each benchmark subprocess runs: preparing weights + artifact, and one measured system.

Systems (each in its own process, one after another):
  runtime   the exported artifact through `runtime.load` (what users run)
  live      the live JAX model: jax.jit(ModelFunctions.prefill / .decode), the same functions
            the artifact was exported from, compiled in process
  hostloop  a Python loop over single decode steps: jax.jit(model.step) once per token, greedy
            argmax on the host (what the on-device loop replaces)
  hf        HF transformers' Mamba2ForCausalLM (PyTorch, CPU)

Decode timings exclude prefill everywhere: the JAX systems time the decode call alone (the
prefill's state and logits are computed before the clock starts); HF timestamps every token
with a streamer and times from the first new token to the last (n - 1 steps; the first new
token is the one prefill's logits give).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench_lib.common import log, prompt_tokens, stats, timed, token_clock

TOKEN_CHECK = 32  # greedy tokens of row 0 kept for the cross-system agreement check


# ---------------------------------------------------------------------------------------------
# Preparation: one set of seeded random weights for every system, and the cpu artifact.


def hf_config_json(cfg) -> dict:
    """An HF `config.json` for Mamba2ForCausalLM with exactly `cfg`'s shapes (tied embeddings)."""
    d = cfg.to_dict()
    d.pop("name")
    d["time_step_limit"] = [float(v) for v in cfg.time_step_limit]  # json writes inf as Infinity
    return {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "hidden_act": "silu",
            "rms_norm": True, "dtype": "float32", **d}


def prep(spec: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    from exporter.artifact import write_artifact
    from exporter.config import Mamba2Config
    from exporter.functions import Limits, ModelFunctions
    from exporter.loading import load_params
    from exporter.params import count_params

    cfg = Mamba2Config.from_dict(spec["cfg"])
    who = f"prep {spec['label']}"
    wdir, art = Path(spec["weights_dir"]), Path(spec["artifact_dir"])
    out = {"count_params": count_params(cfg)}

    t0 = time.perf_counter()
    params = load_params(cfg, None, jnp.float32, spec["seed"])
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()}
    del params
    out["random_weights_s"] = time.perf_counter() - t0
    wdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    save_file(arrays, str(wdir / "model.safetensors"), metadata={"format": "pt"})
    (wdir / "config.json").write_text(json.dumps(hf_config_json(cfg), indent=2) + "\n")
    out["save_weights_s"] = time.perf_counter() - t0
    out["weights_file_bytes"] = (wdir / "model.safetensors").stat().st_size
    del arrays
    log(f"weights: {out['count_params'] / 1e6:.1f}M params, {out['weights_file_bytes'] / 2**20:.0f} MiB "
        f"-> {wdir}", who)

    if spec.get("export", True):
        t0 = time.perf_counter()
        fns = ModelFunctions(cfg, jnp.float32, Limits(**spec["limits"]), platform="cpu")
        write_artifact(fns, ("cpu",), art, force=True)
        out["export_s"] = time.perf_counter() - t0
        out["artifact_bytes"] = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
        log(f"exported cpu artifact in {out['export_s']:.1f}s -> {art}", who)
    return out


# ---------------------------------------------------------------------------------------------
# The three JAX systems share one measurement driver over this small engine interface.


class _Engine:
    """prefill(tokens, lengths) -> (logits, state); decode(state, logits, finished, budget,
    start_step, keys) -> (tokens [b, >=budget], counts [b], state, logits, finished)."""

    name = "?"

    def fresh(self, state):
        """A state the next decode call may consume (a copy where decode donates its input)."""
        return state


class RuntimeEngine(_Engine):
    name = "runtime"

    def __init__(self, spec: dict):
        import numpy as np

        import runtime
        from runtime.engine.requests import SamplingParams

        self.model = runtime.load(spec["artifact_dir"], weights=spec["weights_dir"])
        self.sampling = SamplingParams()  # greedy
        self.stop_ids = np.full((self.model.limits["max_stop_tokens"],), -1, np.int32)  # no stops

    def prefill(self, tokens, lengths):
        return self.model.prefill(tokens, lengths)

    def decode(self, state, logits, finished, budget, start, keys, sampling=None):
        return self.model.decode(state, logits, finished, budget, start, keys, sampling or self.sampling,
                                 self.stop_ids)


class LiveEngine(_Engine):
    name = "live"

    def __init__(self, spec: dict):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from exporter.config import Mamba2Config
        from exporter.functions import Limits, ModelFunctions
        from exporter.loading import load_params

        self.cfg = Mamba2Config.from_dict(spec["cfg"])
        self.fns = ModelFunctions(self.cfg, jnp.float32, Limits(**spec["limits"]), platform="cpu")
        self.params = load_params(self.cfg, spec["weights_dir"], jnp.float32)
        self._prefill = jax.jit(self.fns.prefill)
        self._decode = jax.jit(self.fns.decode)
        self.stop_ids = np.full((self.fns.limits.max_stop_tokens,), -1, np.int32)

    def prefill(self, tokens, lengths):
        from exporter.state import empty_state

        return self._prefill(self.params, empty_state(self.cfg, tokens.shape[0]), tokens, lengths)

    def decode(self, state, logits, finished, budget, start, keys):
        import numpy as np

        b = np.shape(finished)[0]
        row = lambda v, dt: np.full((b,), v, dt)  # noqa: E731 - one setting for every row
        f32, i32 = np.float32, np.int32
        return self._decode(self.params, state, logits, finished, row(budget, i32), row(start, i32), keys,
                            row(0.0, f32), row(0, i32), row(1.0, f32), row(0.0, f32),
                            np.tile(self.stop_ids, (b, 1)))


class HostLoopEngine(LiveEngine):
    """Prefill as `live`; decode as one jitted model.step per token called from Python, greedy
    argmax on the host. The cache argument is donated (updated in place where XLA can)."""

    name = "hostloop"

    def __init__(self, spec: dict):
        import jax

        super().__init__(spec)
        fns = self.fns

        def step(p, tok, state):
            model = fns.model(p)
            logits, carry = model.step(tok, model.loop_carry(state), tok >= 0)
            return logits, model.state_dict(carry)

        self._step = jax.jit(step, donate_argnums=2)

    def fresh(self, state):
        import jax
        import jax.numpy as jnp

        return jax.tree.map(jnp.copy, state)

    def decode(self, state, logits, finished, budget, start, keys):
        import numpy as np

        cache = state
        toks = []
        for _ in range(int(budget)):
            tok = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)  # device -> host -> device
            toks.append(tok)
            logits, cache = self._step(self.params, tok, cache)
        b = logits.shape[0]
        tokens = np.stack(toks, axis=1) if toks else np.zeros((b, 0), np.int32)
        return tokens, np.full((b,), len(toks), np.int32), cache, logits, finished


ENGINES = {"runtime": RuntimeEngine, "live": LiveEngine, "hostloop": HostLoopEngine}


def _rss_mib() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - informational only
        return None


def measure_jax(system: str, spec: dict) -> dict:
    import jax
    import numpy as np

    who = f"{system} {spec['label']}"
    V, seed, reps = spec["cfg"]["vocab_size"], spec["seed"], spec["repeats"]
    res: dict = {"system": system}
    t0 = time.perf_counter()
    eng = ENGINES[system](spec)
    res["setup_s"] = time.perf_counter() - t0
    res["rss_after_setup_mib"] = _rss_mib()
    log(f"loaded in {res['setup_s']:.1f}s", who)
    measures = set(spec["measures"])

    if "prefill" in measures and system != "hostloop":  # hostloop's prefill is live's
        res["prefill"] = {}
        for T in spec["prefill_T"]:
            tokens = prompt_tokens(V, 1, T, seed)
            lengths = np.array([T], np.int32)
            r = timed(lambda: jax.block_until_ready(eng.prefill(tokens, lengths)), reps)
            r["tok_s"] = T / r["median_s"]
            res["prefill"][str(T)] = r
            log(f"prefill T={T}: {r['tok_s']:.1f} tok/s (median of {reps}; first call {r['warmup_s']:.1f}s)", who)

    P = spec["prompt_len"]
    if "decode" in measures:
        res["decode"] = {}
        for B in spec["decode_B"]:
            tokens = prompt_tokens(V, B, P, seed)
            logits, state = jax.block_until_ready(eng.prefill(tokens, np.full((B,), P, np.int32)))
            finished, keys = np.zeros((B,), bool), np.zeros((B, 2), np.uint32)
            t0 = time.perf_counter()
            jax.block_until_ready(eng.decode(eng.fresh(state), logits, finished, 1, 0, keys))  # compile
            compile_s = time.perf_counter() - t0
            for n in spec["decode_n"]:
                r = _timed_fresh(eng, state, logits, finished, keys, n, reps)
                out = r.pop("last_out")
                counts = np.asarray(out[1])
                r["counts_ok"] = bool((counts == n).all())
                r["tok_s"] = B * n / r["median_s"]
                r["first_call_s"] = compile_s
                res["decode"][f"B{B}_n{n}"] = r
                if B == 1 and "tokens" not in res:
                    res["tokens"] = np.asarray(out[0])[0, :n][:TOKEN_CHECK].tolist()
                log(f"decode B={B} n={n}: {r['tok_s']:.1f} tok/s total (median of {reps})", who)
            if B == 1 and system == "runtime":
                res["decode_sampled"] = _sampled_runtime(eng, state, logits, finished, spec, who)

    if "position" in measures:
        res["position"] = _position_jax(eng, spec, who)
    return res


# Sampled decode beside greedy (batch 1): plain temperature (a categorical draw, no sort), top-k
# (lax.top_k), top-p (the one path that sorts the vocabulary).
SAMPLED = {"temperature": dict(temperature=0.8), "top_k": dict(temperature=0.8, top_k=40),
           "top_p": dict(temperature=0.8, top_p=0.95)}


def _sampled_runtime(eng, state, logits, finished, spec, who) -> dict:
    import jax
    import numpy as np

    from runtime.engine.requests import RowSettings

    n, reps, out = spec["decode_n"][0], spec["repeats"], {}
    keys = np.array([[0, 7]], np.uint32)
    for name, kw in SAMPLED.items():
        settings = RowSettings.build(1, **kw)
        jax.block_until_ready(eng.decode(state, logits, finished, 1, 0, keys, settings))  # compile
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(eng.decode(state, logits, finished, n, 0, keys, settings))
            times.append(time.perf_counter() - t0)
        r = stats(times)
        r["tok_s"] = n / r["median_s"]
        out[name] = r
        log(f"sampled decode ({name}) B=1 n={n}: {r['tok_s']:.1f} tok/s (median of {reps})", who)
    return out


def _timed_fresh(eng, state, logits, finished, keys, n, reps) -> dict:
    """Decode `n` tokens `reps` times from the same prefill state; eng.fresh() is not timed."""
    import jax

    times, out = [], None
    for _ in range(reps):
        s = eng.fresh(state)
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        out = jax.block_until_ready(eng.decode(s, logits, finished, n, 0, keys))
        times.append(time.perf_counter() - t0)
    r = stats(times)
    r["last_out"] = out
    return r


def _position_jax(eng, spec: dict, who: str) -> dict:
    """ms/token of each block of `block` tokens up to `position_max` new tokens (batch 1)."""
    import jax
    import numpy as np

    V, P, block = spec["cfg"]["vocab_size"], spec["prompt_len"], spec["block"]
    n_max = spec["position_max"]
    tokens = prompt_tokens(V, 1, P, spec["seed"])
    logits0, state0 = jax.block_until_ready(eng.prefill(tokens, np.array([P], np.int32)))
    finished, keys = np.zeros((1,), bool), np.zeros((1, 2), np.uint32)
    jax.block_until_ready(eng.decode(eng.fresh(state0), logits0, finished, 1, 0, keys))  # compiled
    positions = list(range(block, n_max + 1, block))
    sweeps = []
    for s in range(spec["position_repeats"]):
        state, logits, ms = eng.fresh(state0), logits0, []
        jax.block_until_ready(state)
        for i, _ in enumerate(positions):
            t0 = time.perf_counter()
            out = jax.block_until_ready(eng.decode(state, logits, finished, block, i * block, keys))
            ms.append((time.perf_counter() - t0) * 1e3 / block)
            state, logits = out[2], out[3]
        sweeps.append(ms)
        log(f"position sweep {s + 1}/{spec['position_repeats']}: {ms[0]:.2f} ms/token at {positions[0]}, "
            f"{ms[-1]:.2f} at {positions[-1]}", who)
    return _position_summary(positions, sweeps, block, P, "decode call per block, batch 1")


def _position_summary(positions, sweeps, block, prompt_len, how) -> dict:
    import numpy as np

    arr = np.asarray(sweeps)
    med = np.median(arr, axis=0)
    slope = float(np.polyfit(positions, med, 1)[0]) * 1000 if len(positions) > 1 else 0.0
    return {"positions": positions, "ms_per_token": med.tolist(), "min": arr.min(0).tolist(),
            "max": arr.max(0).tolist(), "sweeps": arr.tolist(), "block": block, "prompt_len": prompt_len,
            "slope_ms_per_1k_positions": slope, "how": how}


# ---------------------------------------------------------------------------------------------
# HF transformers (PyTorch)


def measure_hf(spec: dict) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import Mamba2ForCausalLM

    who = f"hf {spec['label']}"
    torch.set_num_threads(spec["hf_threads"])
    V, seed, reps, P = spec["cfg"]["vocab_size"], spec["seed"], spec["repeats"], spec["prompt_len"]
    res: dict = {"system": "hf", "torch": torch.__version__, "transformers": transformers.__version__,
                 "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    model, info = Mamba2ForCausalLM.from_pretrained(spec["weights_dir"], dtype=torch.float32,
                                                    output_loading_info=True)
    model.eval()
    res["setup_s"] = time.perf_counter() - t0
    res["rss_after_setup_mib"] = _rss_mib()
    res["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items() if v}
    res["tied_embeddings"] = model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, spec["cfg"]["pad_token_id"] or 0, None
    log(f"loaded in {res['setup_s']:.1f}s (tied embeddings: {res['tied_embeddings']}, "
        f"loading issues: {res['loading_info'] or 'none'})", who)
    measures = set(spec["measures"])

    def generate(ids, n):
        clock = token_clock()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             min_new_tokens=n, max_new_tokens=n, eos_token_id=None,
                             pad_token_id=gc.pad_token_id, use_cache=True, streamer=clock)
        if out.shape[1] != ids.shape[1] + n or len(clock.t) != n + 1:
            raise RuntimeError(f"HF generate made {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        return out, clock.t

    with torch.inference_mode():
        if "prefill" in measures:
            res["prefill"] = {}
            for T in spec["prefill_T"]:
                ids = torch.from_numpy(prompt_tokens(V, 1, T, seed).astype(np.int64))
                r = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), reps)
                r["tok_s"] = T / r["median_s"]
                res["prefill"][str(T)] = r
                log(f"prefill T={T}: {r['tok_s']:.1f} tok/s (median of {reps})", who)

        if "decode" in measures:
            res["decode"] = {}
            for B in spec["decode_B"]:
                ids = torch.from_numpy(prompt_tokens(V, B, P, seed).astype(np.int64))
                generate(ids, 2)  # warm-up
                for n in spec["decode_n"]:
                    times, walls, out = [], [], None
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        out, t = generate(ids, n)
                        walls.append(time.perf_counter() - t0)
                        times.append(t[-1] - t[1])  # n - 1 decode steps after the first new token
                    r = stats(times)
                    r["steps"] = n - 1
                    r["generate_wall"] = stats(walls)
                    r["tok_s"] = B * (n - 1) / r["median_s"]
                    res["decode"][f"B{B}_n{n}"] = r
                    if B == 1 and "tokens" not in res:
                        res["tokens"] = out[0, P:].tolist()[:TOKEN_CHECK]
                    log(f"decode B={B} n={n}: {r['tok_s']:.1f} tok/s total (median of {reps})", who)

        if "position" in measures:
            block, n_max = spec["block"], spec["position_max"]
            ids = torch.from_numpy(prompt_tokens(V, 1, P, seed).astype(np.int64))
            positions = list(range(block, n_max + 1, block))
            sweeps = []
            for s in range(spec["position_repeats"]):
                _, t = generate(ids, n_max)  # t[i]: when the i-th new token was emitted
                ms = [(t[p] - t[max(p - block, 1)]) * 1e3 / (p - max(p - block, 1)) for p in positions]
                sweeps.append(ms)
                log(f"position sweep {s + 1}/{spec['position_repeats']}: {ms[0]:.2f} ms/token at "
                    f"{positions[0]}, {ms[-1]:.2f} at {positions[-1]}", who)
            res["position"] = _position_summary(positions, sweeps, block, P,
                                                "one generate call, per-token streamer timestamps")
    return res


# ---------------------------------------------------------------------------------------------
# Start to first token: a fresh interpreter that loads the artifact and generates one token.

FIRST_TOKEN_SNIPPET = """
import json, sys, time
t_start = time.time()
import runtime
model = runtime.load(sys.argv[1], weights=sys.argv[2])
t_loaded = time.time()
tokens = model.generate([list(range(1, 17))], max_new_tokens=1)
t_first = time.time()
print("FIRST_TOKEN_JSON " + json.dumps({"t_start": t_start, "t_loaded": t_loaded, "t_first": t_first,
                                         "tokens": tokens}), flush=True)
"""
