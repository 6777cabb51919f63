"""Hybrid families against HF transformers, in the same run: decode tok/s at given positions
(attention layers make a step's cost grow with the context; this shows by how much) and prefill
tok/s, one small configuration per family, fp32 on this machine's CPU.

    .venv/bin/python scripts/bench_hybrid.py                      # full run -> bench-hybrid-out/
    .venv/bin/python scripts/bench_hybrid.py --quick --out /tmp/b  # smoke run (tiny models)

Per family: seeded random weights are drawn by transformers (its own init), saved as a checkpoint
directory, and loaded by both systems:
  runtime  a cpu artifact exported from that checkpoint (context = the longest position + the
           block), run through `runtime.load`: prefill one call; decode one call of --block
           greedy tokens (the on-device loop)
  hf       `<Family>ForCausalLM.from_pretrained`; prefill = forward(ids, logits_to_keep=1);
           decode = `generate` with a per-token clock (the steps after the first new token)
decode @p: batch 1, a p-token prompt prefilled (untimed), then --block greedy tokens timed;
tok/s = block / seconds. Medians of --repeats. Both systems must emit the same first greedy
tokens at the first position (checked, reported). Numbers are for a quiet machine: run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench_lib.common import log, prompt_tokens, stats, timed, token_clock  # noqa: E402

_COMMON = dict(vocab_size=32768, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_IBM_MAMBA = dict(mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_chunk_size=256)
# One small configuration per family (~110-230M parameters), with the family's layout.
CONFIGS = {
    "bamba": dict(model_type="bamba", hidden_size=768, num_hidden_layers=12, attn_layer_indices=[5, 11],
                  num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048, **_IBM_MAMBA, **_COMMON),
    "nemotron_h": dict(model_type="nemotron_h", hidden_size=768, hybrid_override_pattern="M-M-M*-M-M-M*-",
                       num_attention_heads=12, num_key_value_heads=4, head_dim=64, intermediate_size=3072,
                       mamba_num_heads=24, mamba_head_dim=64, n_groups=4, ssm_state_size=128, chunk_size=128,
                       **_COMMON),
    "granitemoehybrid": dict(model_type="granitemoehybrid", hidden_size=768, num_hidden_layers=12,
                             layer_types=["mamba"] * 5 + ["attention"] + ["mamba"] * 5 + ["attention"],
                             num_attention_heads=12, num_key_value_heads=4, num_local_experts=16,
                             num_experts_per_tok=4, intermediate_size=256, shared_intermediate_size=1024,
                             embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / 64,
                             logits_scaling=6.0, **_IBM_MAMBA, **_COMMON),
    "falcon_h1": dict(model_type="falcon_h1", hidden_size=512, num_hidden_layers=24, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, intermediate_size=768, mamba_d_ssm=768, mamba_n_heads=24,
                      mamba_d_head=32, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=128,
                      mamba_rms_norm=False, mamba_norm_before_gate=False, **_COMMON),  # Falcon-H1-Tiny-90M's shape
    "zamba2": dict(model_type="zamba2", hidden_size=768, num_hidden_layers=12,
                   layers_block_type=["mamba"] * 5 + ["hybrid"] + ["mamba"] * 5 + ["hybrid"], num_attention_heads=12,
                   n_mamba_heads=24, mamba_d_state=64, num_mem_blocks=2, use_shared_attention_adapter=True,
                   adapter_rank=64, intermediate_size=3072, **_COMMON),
}
_TINY = dict(hidden_size=64, vocab_size=512)  # --quick


def quick_config(family: str) -> dict:
    """The family's layout at toy width (smoke runs)."""
    c = {**CONFIGS[family], **_TINY}
    for key, val in (("intermediate_size", 128), ("shared_intermediate_size", 64), ("mamba_n_heads", 4),
                     ("mamba_d_head", 32), ("mamba_num_heads", 4), ("mamba_head_dim", 32), ("n_mamba_heads", 4),
                     ("mamba_d_ssm", 128), ("adapter_rank", 8), ("head_dim", 16), ("num_attention_heads", 4),
                     ("num_key_value_heads", 2), ("mamba_d_state", 16), ("ssm_state_size", 16), ("n_groups", 1),
                     ("mamba_chunk_size", 32), ("chunk_size", 32)):
        if key in c:
            c[key] = val
    if family == "zamba2":
        c["num_key_value_heads"] = c["num_attention_heads"]  # HF's Zamba2 adapters need MHA
    if family == "granitemoehybrid":
        c["intermediate_size"] = 32
    return c


# ---------------------------------------------------------------------------------------------


def make_checkpoint(family: str, cfg: dict, path: Path, seed: int) -> dict:
    import torch
    import transformers

    from exporter.hybrid_config import ARCHITECTURES

    arch = {v: k for k, v in ARCHITECTURES.items()}[family]
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    hf_cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hf_cfg).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return {"architecture": arch, "params": sum(p.numel() for p in model.parameters())}


class RuntimeSystem:
    """The exported artifact through the runtime's raw prefill / decode calls (batch 1)."""

    def __init__(self, ckpt: Path, work: Path, args):
        import jax.numpy as jnp
        import numpy as np

        import runtime
        from exporter.architectures import load_model_config
        from exporter.artifact import write_artifact
        from exporter.functions import ModelFunctions
        from runtime.engine.requests import SamplingParams
        from runtime.format.manifest import Limits

        self.np, self.sampling = np, SamplingParams()  # greedy
        self.cfg = load_model_config(str(ckpt))
        longest = max(max(args.positions), max(args.prefill_T))
        limits = Limits(max_batch=1, max_prompt_tokens=longest, max_new_tokens=args.block, decode_block=args.block,
                        max_prefill_tokens=longest, max_stop_tokens=1, max_context=longest + args.block + 1)
        write_artifact(ModelFunctions(self.cfg, jnp.float32, limits), ["cpu"], work / "art", force=True)
        self.model = runtime.load(work / "art", ckpt)
        self.keys = np.zeros((1, 2), np.uint32)

    def prefill(self, ids):
        logits, state = self.model.prefill(ids, self.np.asarray([ids.shape[1]], self.np.int32))
        return self.np.asarray(logits), state

    def decode(self, state, logits, n):
        out = self.model.decode(state, logits, self.np.zeros((1,), bool), n, 0, self.keys, self.sampling,
                                self.np.full((1,), -1, self.np.int32))
        return [int(t) for t in self.np.asarray(out[0])[0, :n]]


def measure_runtime(path: Path, work: Path, args, who: str) -> dict:
    t0 = time.perf_counter()
    sys_ = RuntimeSystem(path, work, args)
    res = {"setup_s": time.perf_counter() - t0, "prefill": {}, "decode": {}}
    V = sys_.cfg.vocab_size
    for T in args.prefill_T:
        ids = prompt_tokens(V, 1, T, args.seed)
        r = timed(lambda: sys_.prefill(ids), args.repeats)
        r["tok_s"] = T / r["median_s"]
        res["prefill"][str(T)] = r
        log(f"prefill T={T}: {r['tok_s']:.1f} tok/s", who)
    for p in args.positions:
        logits, state = sys_.prefill(prompt_tokens(V, 1, p, args.seed))
        sys_.decode(state, logits, args.block)  # compile (first position) / warm
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            toks = sys_.decode(state, logits, args.block)
            times.append(time.perf_counter() - t0)
        r = stats(times)
        r["tok_s"] = args.block / r["median_s"]
        res["decode"][str(p)] = r
        res.setdefault("tokens", toks[: args.check])
        log(f"decode @{p}: {r['tok_s']:.1f} tok/s", who)
    return res


def measure_hf(path: Path, arch: str, args, who: str) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    V = model.config.vocab_size

    res = {"prefill": {}, "decode": {}}
    with torch.inference_mode():
        for T in args.prefill_T:
            ids = torch.from_numpy(prompt_tokens(V, 1, T, args.seed).astype("int64"))
            r = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), args.repeats)
            r["tok_s"] = T / r["median_s"]
            res["prefill"][str(T)] = r
            log(f"prefill T={T}: {r['tok_s']:.1f} tok/s", who)
        for p in args.positions:
            ids = torch.from_numpy(prompt_tokens(V, 1, p, args.seed).astype("int64"))
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2,
                           eos_token_id=None, pad_token_id=0)  # warm-up
            times, out = [], None
            for _ in range(args.repeats):
                clock = token_clock()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.block + 1, min_new_tokens=args.block + 1,
                                     eos_token_id=None, pad_token_id=0, use_cache=True, streamer=clock)
                times.append(clock.t[-1] - clock.t[1])  # block steps after the first new token
            r = stats(times)
            r["tok_s"] = args.block / r["median_s"]
            res["decode"][str(p)] = r
            res.setdefault("tokens", out[0, p:].tolist()[: args.check])
            log(f"decode @{p}: {r['tok_s']:.1f} tok/s", who)
    return res


def table(results: dict, args) -> str:
    pos = [str(p) for p in args.positions]
    head = (["family", "system", *(f"prefill T={T}" for T in args.prefill_T), *(f"decode @{p}" for p in pos),
             f"@{pos[-1]} / @{pos[0]}"])
    rows = [head]
    for fam, r in results.items():
        for name in ("runtime", "hf"):
            s = r.get(name)
            if not s:
                continue
            dec = [s["decode"][p]["tok_s"] for p in pos]
            rows.append([fam, name, *(f"{s['prefill'][str(T)]['tok_s']:.0f}" for T in args.prefill_T),
                         *(f"{d:.1f}" for d in dec), f"{dec[-1] / dec[0]:.2f}"])
        if r.get("runtime") and r.get("hf"):
            ours, hf = r["runtime"], r["hf"]
            rows.append([fam, "runtime / hf",
                         *(f"{ours['prefill'][str(T)]['tok_s'] / hf['prefill'][str(T)]['tok_s']:.2f}x"
                           for T in args.prefill_T),
                         *(f"{ours['decode'][p]['tok_s'] / hf['decode'][p]['tok_s']:.2f}x" for p in pos), ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--positions", default="64,1024,4096", help="decode positions (prompt lengths)")
    ap.add_argument("--prefill-T", default="512", help="prefill lengths")
    ap.add_argument("--block", type=int, default=32, help="decode steps timed per position")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", type=int, default=16, help="greedy tokens compared between systems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="toy widths, positions 16,64, T=64, block 8, 1 repeat")
    ap.add_argument("--out", default="bench-hybrid-out")
    args = ap.parse_args(argv)
    if args.quick:
        args.positions, args.prefill_T, args.block, args.repeats, args.check = "16,64", "64", 8, 1, 8
    args.positions = [int(x) for x in str(args.positions).split(",")]
    args.prefill_T = [int(x) for x in str(args.prefill_T).split(",")]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in CONFIGS]
    if unknown:
        ap.error(f"unknown families {unknown}: choose from {', '.join(CONFIGS)}")

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    try:
        for fam in families:
            cfg = quick_config(fam) if args.quick else CONFIGS[fam]
            path = work / fam
            info = make_checkpoint(fam, cfg, path, args.seed)
            log(f"{info['architecture']}: {info['params'] / 1e6:.1f}M params", fam)
            r = results[fam] = {"config": cfg, **info}
            r["runtime"] = measure_runtime(path, work / f"{fam}-art", args, f"{fam} runtime")
            if not args.skip_hf:
                r["hf"] = measure_hf(path, info["architecture"], args, f"{fam} hf")
                r["tokens_agree"] = r["runtime"]["tokens"] == r["hf"]["tokens"]
                log(f"first {args.check} greedy tokens agree: {r['tokens_agree']}", fam)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(results, args)
    print(text)
    import jax
    import torch

    (out / "bench-hybrid.json").write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items()}, "results": results, "table": text,
    }, indent=1))
    (out / "bench-hybrid-table.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
