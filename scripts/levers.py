"""Measure the CPU performance levers one at a time (fp32, a preset with seeded random weights).

    python scripts/levers.py [--model 130m] [--out bench-out/levers.json] [--only loop,matvec,...]

Levers:
  loop    decode step with the layer loop unrolled (per-layer weights, what we export) against
          lax.scan over stacked weights: ms/token, compile seconds, serialized export size.
  matvec  decode with row-streaming matvecs (the cpu kernel choice) against plain dots, B=1,4,8.
  chunk   prefill tok/s at T=2048 for SSD chunk 64, 128, 256.
  lmhead  share of a decode step spent in the lm_head (vocab rows incl. padding).
  donate  decode calls with the cache buffers donated against not.
Each timing is the median of several runs (wall clock); decode ms/token is taken from the
difference between two loop budgets, so prefill, dispatch and transfers cancel out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from exporter.config import PRESETS
from exporter.functions import Limits, ModelFunctions
from exporter.loading import load_params
from exporter.model import Block
from exporter.numerics import for_platform
from exporter.params import bind, merge_flat
from exporter.state import empty_state


def timed(f, *args, repeat=5):
    jax.block_until_ready(f(*args))  # compile + warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_ms_per_token(fns: ModelFunctions, params, batch: int, donate: bool = False) -> float:
    cfg = fns.cfg
    f = jax.jit(fns.decode, donate_argnums=(1,) if donate else ())

    def run(n):
        rows = lambda v, dt: np.full((batch,), v, dt)  # noqa: E731
        args = (params, empty_state(cfg, batch), jnp.zeros((batch, cfg.vocab_size)), jnp.zeros(batch, bool),
                rows(n, np.int32), rows(0, np.int32), jnp.zeros((batch, 2), jnp.uint32), rows(0, np.float32),
                rows(0, np.int32), rows(1, np.float32), rows(0, np.float32),
                -jnp.ones((batch, fns.limits.max_stop_tokens), jnp.int32))
        return f(*args)

    short = timed(lambda: run(4))
    long = timed(lambda: run(36))
    return (long - short) / 32 * 1e3


def lever_loop(cfg, params):
    """Unrolled layers over per-layer weights vs lax.scan over weights stacked [L, ...]."""
    fns = ModelFunctions(cfg, jnp.float32, Limits(max_new_tokens=64, decode_block=64))
    L = cfg.num_hidden_layers
    numerics = for_platform("cpu", cfg.chunk_size, jnp.float32)
    graphdef, block_state = nnx.split(nnx.eval_shape(lambda: Block(cfg, jnp.float32, numerics)))
    suffixes = [".".join(map(str, p)) for p, _ in block_state.flat_state()]
    stacked = {s: jnp.stack([params[f"backbone.layers.{i}.{s}"] for i in range(L)]) for s in suffixes}
    rest = {k: v for k, v in params.items() if ".layers." not in k}
    # Embedding, final norm and head: the same model with no layers.
    shell = ModelFunctions(dataclasses.replace(cfg, num_hidden_layers=0), jnp.float32, Limits())

    active = jnp.ones((1,), bool)

    def scan_step(rest, stacked, tok, conv, ssm):
        model = shell.model(rest)
        resid = model.backbone.embeddings(tok).astype(jnp.float32)

        def body(resid, xs):
            layer_params, c, s = xs
            resid, c, s = merge_flat(graphdef, block_state, layer_params).step(resid, c, s, active)
            return resid, (c, s)

        resid, (conv, ssm) = jax.lax.scan(body, resid, (stacked, conv, ssm))
        return model.logits(resid), conv, ssm

    def unrolled_step(params, tok, conv, ssm):
        model = fns.model(params)
        logits, carry = model.step(tok, model.loop_carry({"conv": conv, "ssm": ssm}), active)
        state = model.state_dict(carry)
        return logits, state["conv"], state["ssm"]

    cache = empty_state(cfg, 1)
    tok = jnp.zeros((1,), jnp.int32)
    out = {}
    for name, f, args in (("unrolled", unrolled_step, (params, tok, cache["conv"], cache["ssm"])),
                          ("scan", scan_step, (rest, stacked, tok, cache["conv"], cache["ssm"]))):
        t0 = time.perf_counter()
        compiled = jax.jit(f).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        size = len(jax.export.export(jax.jit(f), platforms=("cpu",))(*args).serialize())
        ms = timed(compiled, *args, repeat=10) * 1e3
        out[name] = {"ms_per_step": ms, "compile_s": compile_s, "export_bytes": size}
    return out


def lever_matvec(cfg, params):
    out = {}
    for batch in (1, 4, 8):
        limits = Limits(max_new_tokens=64, decode_block=64)
        row = decode_ms_per_token(ModelFunctions(cfg, jnp.float32, limits, platform="cpu"), params, batch)
        dot = decode_ms_per_token(ModelFunctions(cfg, jnp.float32, limits, platform="cuda"), params, batch)
        out[f"B={batch}"] = {"rowwise_ms": row, "dot_ms": dot}
    return out


def lever_chunk(cfg, params, T=2048):
    out = {}
    toks, lens = jnp.zeros((1, T), jnp.int32), jnp.array([T], jnp.int32)
    state = empty_state(cfg, 1)
    for chunk in (64, 128, 256):
        numerics = dataclasses.replace(for_platform("cpu", cfg.chunk_size, jnp.float32), chunk_size=chunk)
        prefill = jax.jit(lambda p, s, t, n: bind(cfg, p, jnp.float32, numerics).prefill(s, t, n))
        s = timed(prefill, params, state, toks, lens, repeat=3)
        out[f"chunk={chunk}"] = {"seconds": s, "tok_per_s": T / s}
    return out


def lever_lmhead(cfg, params):
    fns = ModelFunctions(cfg, jnp.float32, Limits())
    cache = empty_state(cfg, 1)
    tok = jnp.zeros((1,), jnp.int32)

    def step(p, t, c):
        model = fns.model(p)
        return model.step(t, model.loop_carry(c), t >= 0)

    full = timed(jax.jit(step), params, tok, cache, repeat=10)
    h = jnp.ones((1, cfg.hidden_size))
    head = timed(jax.jit(lambda p, h: fns.model(p).logits(h)), params, h, repeat=10)
    return {"step_ms": full * 1e3, "lm_head_ms": head * 1e3, "share": head / full,
            "vocab": cfg.vocab_size, "padding_rows": cfg.vocab_size - 50277 if cfg.name in PRESETS else 0}


def lever_donate(cfg, params):
    fns = ModelFunctions(cfg, jnp.float32, Limits(max_new_tokens=64, decode_block=64))
    return {f"B={b}": {"donated_ms": decode_ms_per_token(fns, params, b, donate=True),
                       "copied_ms": decode_ms_per_token(fns, params, b)} for b in (1, 8)}


LEVERS = {"loop": lever_loop, "matvec": lever_matvec, "chunk": lever_chunk, "lmhead": lever_lmhead,
          "donate": lever_donate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="130m", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, default=Path("bench-out/levers.json"))
    ap.add_argument("--only", default=",".join(LEVERS))
    args = ap.parse_args(argv)
    cfg = PRESETS[args.model]
    params = load_params(cfg, None)
    results = {"model": args.model, "jax": jax.__version__, "levers": {}}
    for name in args.only.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results["levers"][name] = LEVERS[name](cfg, params)
        print(json.dumps(results["levers"][name], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
