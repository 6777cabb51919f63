"""The state, carried: multi-turn time to first token with and without the prefix cache, and
long-prompt prefill (tok/s, peak RSS) at 8k / 32k / 100k tokens.

    python scripts/bench_state.py [--model 130m] [--out bench-out/state] [--quick]

Multi-turn: a 10-turn conversation, each turn +200 tokens of user text and +64 greedy tokens
(eos ignored). The same conversation runs twice in one process, turn by turn alternating: once
with `prefix_cache_mb` (each turn continues from the state the previous turn left) and once
re-prefilling the whole history. Time to first token per turn = request start to the first
streamed token (block of 1). Both sides must produce the same tokens.

Long prompts: one fresh process per length (its peak RSS is its own): load, compile the
segment shapes on a short prompt, then time `prefill_state` over n random tokens and read
ru_maxrss. Prints a table and writes state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_lib.common import log, prompt_tokens  # noqa: E402


def prepare(model: str, layers: int | None, work: Path, seed: int) -> tuple[Path, Path, dict]:
    """Seeded random weights (HF layout) and a cpu artifact for them: (artifact, weights, cfg)."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    from bench_lib.systems import hf_config_json
    from exporter.artifact import write_artifact
    from exporter.config import PRESETS
    from exporter.functions import Limits, ModelFunctions
    from exporter.loading import load_params

    cfg = PRESETS[model]
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    art, weights = work / "artifact", work / "weights"
    if not (art / "manifest.json").exists():
        params = load_params(cfg, None, jnp.float32, seed)
        weights.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()},
                  str(weights / "model.safetensors"), metadata={"format": "pt"})
        (weights / "config.json").write_text(json.dumps(hf_config_json(cfg), indent=2) + "\n")
        write_artifact(ModelFunctions(cfg, jnp.float32, Limits(max_batch=8)), ("cpu",), art, force=True)
    return art, weights, cfg.to_dict()


def first_token_s(model, prompt, n_new: int, **kw) -> tuple[float, list[int]]:
    """(seconds to the first streamed token, all new tokens) of one request."""
    t0 = time.perf_counter()
    ttft, tokens = None, []
    for gen in model.stream([prompt], n_new, block=1, ignore_eos=True, **kw):
        if ttft is None:
            ttft = time.perf_counter() - t0
        tokens += gen.tokens[0]
    return ttft, tokens


def multi_turn(art: Path, weights: Path, vocab: int, turns: int, user: int, new: int, seed: int) -> dict:
    import numpy as np

    import runtime

    cached = runtime.load(art, weights, prefix_cache_mb=1024)
    plain = runtime.load(art, weights)
    rng = np.random.default_rng(seed)
    warm = rng.integers(1, vocab, 8 * user).tolist()  # compile every shape the turns use, untimed
    for m in (cached, plain):
        for n in (user, 2 * user, 4 * user, 8 * user):
            first_token_s(m, warm[:n], 2)
    _, made = first_token_s(cached, warm[:user], 2)
    first_token_s(cached, warm[:user] + made + warm[:user], 2)  # a cache hit: the state stacking ops
    cached.prefix_cache.clear()
    cached.prefix_cache.stats = type(cached.prefix_cache.stats)()
    history: list[int] = []
    rows = []
    for turn in range(1, turns + 1):
        history += rng.integers(1, vocab, user).tolist()
        t_plain, toks_plain = first_token_s(plain, history, new)
        t_cached, toks_cached = first_token_s(cached, history, new)
        same = toks_plain == toks_cached
        rows.append({"turn": turn, "history_tokens": len(history), "ttft_cached_s": t_cached,
                     "ttft_reprefill_s": t_plain, "same_tokens": same})
        log(f"turn {turn}: history {len(history)} tokens, TTFT cached {t_cached * 1e3:.0f} ms, "
            f"re-prefill {t_plain * 1e3:.0f} ms, same tokens: {same}", "multi-turn")
        history += toks_cached
    stats = cached.prefix_cache.stats
    return {"turns": rows, "user_tokens_per_turn": user, "new_tokens_per_turn": new,
            "cache": {"lookups": stats.lookups, "hits": stats.hits, "tokens_skipped": stats.tokens_skipped},
            "turn10_over_turn1_cached": rows[-1]["ttft_cached_s"] / rows[0]["ttft_cached_s"],
            "turn10_over_turn1_reprefill": rows[-1]["ttft_reprefill_s"] / rows[0]["ttft_reprefill_s"]}


_LONG = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[4])
from bench_lib.common import prompt_tokens
import runtime
art, weights, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = runtime.load(art, weights)
vocab = model.limits["vocab_size"]
seg = model.segment_length(1)
model.prefill_state(prompt_tokens(vocab, 1, seg + 17, 1)[0].tolist())  # compiles the shapes used
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prompt = prompt_tokens(vocab, 1, n, 2)[0].tolist()
t0 = time.perf_counter()
state = model.prefill_state(prompt)
state.logits.block_until_ready()
seconds = time.perf_counter() - t0
print(json.dumps({"tokens": n, "seconds": seconds, "tok_s": n / seconds, "segment": seg,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_rss_before_mib": rss_before / 1024}))
"""


def long_prompts(art: Path, weights: Path, lengths: list[int], env: dict) -> list[dict]:
    out = []
    for n in lengths:
        r = subprocess.run([sys.executable, "-c", _LONG, str(art), str(weights), str(n), str(HERE)],
                           capture_output=True, text=True, env=env, timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"long prompt {n}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"{n} tokens: {row['tok_s']:.0f} tok/s, peak RSS {row['peak_rss_mib']:.0f} MiB "
            f"(after compiling: {row['peak_rss_before_mib']:.0f})", "long-prompt")
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="130m")
    p.add_argument("--layers", type=int, help="override the layer count (smoke runs)")
    p.add_argument("--out", type=Path, default=Path("bench-out/state"))
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--user-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--long", help="comma-separated prompt lengths [default: 8192,32768,100000; --quick: 3000]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 layers, 3 short turns, short prompts (smoke)")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.turns, a.user_tokens, a.new_tokens = 2, 3, 40, 8
    a.long = a.long or ("3000" if a.quick else "8192,32768,100000")
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MAMBA2_AOT_CACHE_DIR": os.environ.get("MAMBA2_AOT_CACHE_DIR")
           or tempfile.mkdtemp(prefix="mamba2-aot-bench-cache-")}
    os.environ.update(env)
    art, weights, cfg = prepare(a.model, a.layers, a.out / "model", a.seed)
    turns = multi_turn(art, weights, cfg["vocab_size"], a.turns, a.user_tokens, a.new_tokens, a.seed)
    longs = long_prompts(art, weights, [int(x) for x in a.long.split(",")], env)
    result = {"model": a.model, "layers": cfg["num_hidden_layers"], "multi_turn": turns, "long_prompts": longs}
    (a.out / "state.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nmulti-turn ({a.user_tokens} user + {a.new_tokens} new tokens a turn), time to first token:")
    print(f"{'turn':>4} {'history':>8} {'cached ms':>10} {'re-prefill ms':>14} {'same':>5}")
    for r in turns["turns"]:
        print(f"{r['turn']:>4} {r['history_tokens']:>8} {r['ttft_cached_s'] * 1e3:>10.0f} "
              f"{r['ttft_reprefill_s'] * 1e3:>14.0f} {str(r['same_tokens']):>5}")
    print(f"last turn / first turn: cached {turns['turn10_over_turn1_cached']:.2f}x, "
          f"re-prefill {turns['turn10_over_turn1_reprefill']:.2f}x; cache {turns['cache']}")
    print(f"\n{'prompt tokens':>13} {'prefill tok/s':>14} {'peak RSS MiB':>13}")
    for r in longs:
        print(f"{r['tokens']:>13} {r['tok_s']:>14.0f} {r['peak_rss_mib']:>13.0f}")
    print(f"\nwrote {a.out / 'state.json'}")
    return 0 if all(r["same_tokens"] for r in turns["turns"]) else 1


if __name__ == "__main__":
    sys.exit(main())
