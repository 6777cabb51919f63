"""One-command device check: export for this machine's accelerator, verify against the float32
CPU model, and measure speed against the device's peaks.

    python scripts/device_check.py               # 130m and 1.3b, float32 and bfloat16 (< 8 min on one GPU)
    python scripts/device_check.py --quick       # a tiny model on whatever backend this is (CI: the CPU)
    python scripts/device_check.py --models 130m --dtypes bfloat16 --out /tmp/dc

For each model and dtype: the artifact is exported for the default backend's platform
(exporter.artifact.write_artifact), loaded with seeded random weights from a safetensors file
(runtime.load), and compared with the float32 live model (ModelFunctions.model, platform cpu) on
the host CPU (jax.devices("cpu"): always there), then timed.

Verification (all on the same weights; the reference is the float32 CPU model):
  prefill logits   a ragged batch of 8 prompts (1..16 tokens), and one 2048-token prompt (many
                   SSD chunks): max |device - reference| / max |reference| (relative error).
  greedy tokens    64 greedy tokens per prompt from the device (runtime generate path, one
                   on-device loop). Each is checked against the reference teacher-forced on the
                   device's own history (one CPU forward over prompt + tokens), so one early
                   difference does not cascade. A token that differs from the reference's argmax
                   is a near tie when the reference's own margin between the two is within twice
                   the measured prefill logit error; any other difference is a failure. Reported:
                   each row's agreement length (steps before its first difference).
  final state      the state after the 64 steps against the reference prefilled over prompt +
                   tokens (relative error per leaf, the worst reported).
Pass criteria (random weights have small logit margins, so near ties are expected, and bf16 is
a different model than fp32 by its rounding):
  float32   relative errors <= 1e-3 (float32-faithful math; TF32 or bf16-pass matmuls exceed it)
            and every token difference a near tie.
  bfloat16  relative errors <= 5e-2, and within the first 8 tokens of each row every difference a
            near tie (later bf16 tokens legitimately drift from fp32: agreement length reported).

Speed (medians of --repeats after a warm-up call that compiles): decode tok/s (totals over the
batch, one on-device loop of --decode-tokens steps after a 16-token prefill) at B = 1, 8, 64;
prefill tok/s at T = 2048 (B = 1). Fractions of the device's peaks: decode bandwidth = (weight
bytes + B x state bytes x 2) per step / peak bandwidth; prefill FLOP/s = 2 x non-embedding
params x T / peak (bfloat16 peak for bf16 artifacts; TF32 peak for float32 ones on GPUs, the
precision XLA's default uses there). Peaks come from a table of known devices (matched on
jax's device_kind) and from probes run here (a large reduction; a large matmul per dtype).

Prints a table, writes device_check.json into --out, exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense peaks (no sparsity): bytes/s of HBM and FLOP/s per matmul precision, by device_kind substring.
KNOWN_DEVICES = {
    "H200": {"hbm_gb_s": 4800, "bfloat16_tflops": 989, "tf32_tflops": 495, "float32_tflops": 67},
    "H100 80GB HBM3": {"hbm_gb_s": 3350, "bfloat16_tflops": 989, "tf32_tflops": 495, "float32_tflops": 67},
    "H100 PCIe": {"hbm_gb_s": 2000, "bfloat16_tflops": 756, "tf32_tflops": 378, "float32_tflops": 51},
    "A100-SXM4-80GB": {"hbm_gb_s": 2039, "bfloat16_tflops": 312, "tf32_tflops": 156, "float32_tflops": 19.5},
    "A100-SXM4-40GB": {"hbm_gb_s": 1555, "bfloat16_tflops": 312, "tf32_tflops": 156, "float32_tflops": 19.5},
    "A100-PCIE": {"hbm_gb_s": 1555, "bfloat16_tflops": 312, "tf32_tflops": 156, "float32_tflops": 19.5},
    "L4": {"hbm_gb_s": 300, "bfloat16_tflops": 121, "tf32_tflops": 60, "float32_tflops": 30},
    "TPU v4": {"hbm_gb_s": 1228, "bfloat16_tflops": 275, "float32_tflops": None},
    "TPU v5 lite": {"hbm_gb_s": 819, "bfloat16_tflops": 197, "float32_tflops": None},
    "TPU v5p": {"hbm_gb_s": 2765, "bfloat16_tflops": 459, "float32_tflops": None},
    "TPU v6 lite": {"hbm_gb_s": 1640, "bfloat16_tflops": 918, "float32_tflops": None},
}
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
FIRST_TOKENS = {"float32": None, "bfloat16": 8}  # tokens checked (None: all)
NEAR_TIE = 2.0  # a differing token is a near tie within this many times the prefill logit error


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    steps: int  # greedy tokens compared
    batches: tuple[int, ...]  # decode batch sizes timed
    decode_tokens: int
    prefill_tokens: int
    repeats: int
    budget_s: float
    probe_bytes: int
    probe_gemm: int


def settings(args) -> Settings:
    if args.quick:
        return Settings(("tiny",), tuple(args.dtypes or ("float32", "bfloat16")), 16, (1, 8), 16, 256, 2,
                        args.budget_s, 64 << 20, 256)
    return Settings(tuple(args.models or ("130m", "1.3b")), tuple(args.dtypes or ("float32", "bfloat16")),
                    args.steps, (1, 8, 64), args.decode_tokens, 2048, args.repeats, args.budget_s, 2 << 30, 8192)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- models and weights


def model_config(name: str):
    from exporter.config import PRESETS, Mamba2Config

    if name == "tiny":  # --quick: SSD chunk 16, so the 256-token prompt crosses many chunks
        return Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=16, head_dim=16,
                            chunk_size=16, name="tiny")
    return PRESETS[name]


def limits_for(s: Settings):
    from runtime.format.manifest import Limits

    batch, block = max(s.batches + (8,)), max(s.steps, s.decode_tokens)
    return Limits(max_batch=batch, max_prompt_tokens=s.prefill_tokens, max_new_tokens=block, max_stop_tokens=1,
                  decode_block=block, max_prefill_tokens=max(s.prefill_tokens, batch * 16))


def write_weights(cfg, work: Path, seed: int = 0) -> tuple[Path, dict]:
    """Seeded random float32 weights (the spec's init rules) as one safetensors file, + the arrays."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from exporter.params import weight_spec
    from runtime.tools.random_init import random_weights

    arrays = random_weights(weight_spec(cfg, jnp.float32), seed)
    path = work / f"{cfg.name}-weights.safetensors"
    save_file(arrays, str(path))
    return path, arrays


# ---------------------------------------------------------------- the float32 CPU reference


class Reference:
    """The float32 live model on the host CPU, over the same weights."""

    def __init__(self, cfg, arrays: dict, limits):
        import jax
        import jax.numpy as jnp

        from exporter.functions import ModelFunctions

        self.cpu = jax.devices("cpu")[0]
        self.fns = ModelFunctions(cfg, jnp.float32, limits, platform="cpu")
        self.params = {k: jax.device_put(v, self.cpu) for k, v in arrays.items()}
        fns = self.fns
        self._forward = jax.jit(lambda p, t: fns.model(p).forward(t)[0])
        self._prefill = jax.jit(fns.prefill)

    def forward(self, tokens):
        """All-position logits [b, t, V]."""
        import jax
        import numpy as np

        with jax.default_device(self.cpu):
            return np.asarray(self._forward(self.params, jax.device_put(tokens, self.cpu)))

    def prefill(self, tokens, lengths):
        """(logits [b, V], state) after each row's tokens[:length], from a fresh (zero) state."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        with jax.default_device(self.cpu):
            fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.fns.state_specs(tokens.shape[0]))
            logits, state = self._prefill(self.params, fresh, jax.device_put(tokens, self.cpu),
                                          jax.device_put(lengths, self.cpu))
            return np.asarray(logits), jax.tree.map(np.asarray, state)


# ---------------------------------------------------------------- the device artifact


def export(cfg, dtype: str, platform: str, limits, work: Path) -> tuple[Path, float]:
    import jax.numpy as jnp

    from exporter.artifact import write_artifact
    from exporter.functions import ModelFunctions

    out = work / f"{cfg.name}-{dtype}-{platform}"
    t0 = time.perf_counter()
    write_artifact(ModelFunctions(cfg, jnp.dtype(dtype), limits), [platform], out, force=True)
    return out, time.perf_counter() - t0


def device_greedy(model, prompts, steps: int):
    """(prefill logits [n, V], greedy tokens [n, steps], state after them): the runtime's raw
    prefill and one on-device decode loop (the one place that knows their call signatures)."""
    import jax
    import numpy as np

    from runtime.engine.requests import SamplingParams, check_stop_ids, pad_batch

    tokens, lengths = pad_batch(prompts, model.buckets)
    B, n = tokens.shape[0], len(prompts)
    logits, state = model.prefill(tokens, lengths)
    out, counts, state, _, _ = model.decode(state, logits, np.arange(B) >= n, steps, 0,
                                            np.zeros((B, 2), np.uint32), SamplingParams(),
                                            check_stop_ids(None, model.limits))
    return np.asarray(logits)[:n], np.asarray(out)[:n, :steps], jax.tree.map(np.asarray, state)


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) if a.size else 0.0


def verify(model, ref: Reference, dtype: str, steps: int, prefill_tokens: int, seed: int = 1) -> dict:
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = model.limits["vocab_size"]
    lengths = [1, 3, 16, 7, 12, 2, 9, 5]  # 8 rows: batch bucket 8, prompt bucket 16, no padding rows
    prompts = [rng.integers(1, vocab, n).tolist() for n in lengths]
    dev_logits, dev_tokens, dev_state = device_greedy(model, prompts, steps)
    # The reference, teacher-forced on the device's tokens: one forward over prompt + tokens.
    total = max(lengths) + steps
    full = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        full[i, : len(p) + steps] = p + dev_tokens[i].tolist()
    ref_all = ref.forward(full)  # [8, total, V]
    ref_logits = np.stack([ref_all[i, n - 1] for i, n in enumerate(lengths)])
    abs_err = float(np.max(np.abs(dev_logits.astype(np.float64) - ref_logits)))
    tie = NEAR_TIE * abs_err
    first = FIRST_TOKENS[dtype] or steps
    agreement, failures, near_ties = [], [], 0
    for i, n in enumerate(lengths):
        agree = steps
        for j in range(steps):
            want = ref_all[i, n - 1 + j]
            got = int(dev_tokens[i, j])
            best = int(np.argmax(want))
            if got == best:
                continue
            agree = min(agree, j)
            margin = float(want[best] - want[got])
            if margin <= tie:
                near_ties += 1
            elif j < first:
                failures.append({"row": i, "step": j, "token": got, "reference": best, "margin": margin})
        agreement.append(agree)
    _, ref_state = ref.prefill(full, np.array([n + steps for n in lengths], np.int32))
    state_rel = max(_rel(a, b) for a, b in zip(jax.tree.leaves(dev_state), jax.tree.leaves(ref_state)))
    # One long prompt: prefill across many SSD chunks.
    long = rng.integers(1, vocab, prefill_tokens).astype(np.int32)[None]
    long_logits = np.asarray(model.prefill(long, np.array([prefill_tokens], np.int32))[0])
    long_rel = _rel(long_logits, ref.prefill(long, np.array([prefill_tokens], np.int32))[0])
    tol = TOLERANCE[dtype]
    checks = {"prefill logits": _rel(dev_logits, ref_logits), f"prefill logits T={prefill_tokens}": long_rel,
              "final state": state_rel}
    ok = all(v <= tol for v in checks.values()) and not failures
    return {"ok": ok, "tolerance": tol, "relative_errors": checks, "prefill_logits_max_abs": abs_err,
            "near_tie_margin": tie, "tokens_checked": first, "agreement_lengths": agreement,
            "near_ties": near_ties, "token_failures": failures[:10], "prompt_lengths": lengths, "steps": steps}


# ---------------------------------------------------------------- speed


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: compiles (or loads from the compile cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def measure(model, cfg, s: Settings, peak: dict) -> dict:
    import jax
    import numpy as np

    from runtime.engine.requests import SamplingParams, check_stop_ids, pad_batch

    rng = np.random.default_rng(2)
    vocab = model.limits["vocab_size"]
    weight_bytes = sum(int(a.nbytes) for a in model.params.values())
    embedding = cfg.vocab_size * cfg.hidden_size
    flops_per_token = 2 * (sum(int(a.size) for a in model.params.values()) - embedding)
    out = {"weight_bytes": weight_bytes, "decode": {}, "prefill": {}}
    stop, greedy = check_stop_ids(None, model.limits), SamplingParams()
    for B in s.batches:
        tokens, lengths = pad_batch([rng.integers(1, vocab, 16).tolist() for _ in range(B)], model.buckets)
        logits, state = model.prefill(tokens, lengths)
        state_bytes = sum(int(leaf.nbytes) for leaf in jax.tree.leaves(state)) / tokens.shape[0]
        finished, keys = np.zeros(tokens.shape[0], bool), np.zeros((tokens.shape[0], 2), np.uint32)

        def run():
            jax.block_until_ready(model.decode(state, logits, finished, s.decode_tokens, 0, keys, greedy, stop)[0])

        t, times = _median_time(run, s.repeats)
        step_bytes = weight_bytes + B * state_bytes * 2
        bw = step_bytes * s.decode_tokens / t
        out["decode"][f"B{B}"] = {"tok_s": B * s.decode_tokens / t, "ms_per_step": 1e3 * t / s.decode_tokens,
                                  "bytes_per_step": step_bytes, "gb_s": bw / 1e9, "times_s": times,
                                  "bandwidth_fraction": bw / 1e9 / peak["gb_s"] if peak.get("gb_s") else None}
    T = s.prefill_tokens
    tokens = rng.integers(1, vocab, T).astype(np.int32)[None]
    lengths = np.array([T], np.int32)
    t, times = _median_time(lambda: jax.block_until_ready(model.prefill(tokens, lengths)[0]), s.repeats)
    flops = flops_per_token * T / t
    out["prefill"][f"T{T}"] = {"tok_s": T / t, "tflop_s": flops / 1e12, "times_s": times,
                               "flops_fraction": flops / 1e12 / peak["tflops"] if peak.get("tflops") else None}
    return out


def probes(s: Settings) -> dict:
    """This device's measured read bandwidth (a large sum) and matmul FLOP/s per dtype."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((s.probe_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    t, _ = _median_time(lambda: total(x).block_until_ready(), 5)
    out = {"read_gb_s": x.nbytes / t / 1e9, "matmul_tflops": {}}
    del x
    n = s.probe_gemm
    for dtype in ("bfloat16", "float32"):
        a = jnp.ones((n, n), dtype)
        mm = jax.jit(lambda a, b: a @ b)
        t, _ = _median_time(lambda: mm(a, a).block_until_ready(), 5)
        out["matmul_tflops"][dtype] = 2 * n ** 3 / t / 1e12
    return out


def peaks(device_kind: str, platform: str, measured: dict) -> dict:
    """{dtype: {"gb_s", "tflops", "source"}}: the known table's figures, else the probes'."""
    known = next((v for k, v in KNOWN_DEVICES.items() if k.lower() in device_kind.lower()), None)
    out = {}
    for dtype in ("float32", "bfloat16"):
        if known is not None:
            key = ("bfloat16_tflops" if dtype == "bfloat16"
                   else "tf32_tflops" if platform == "cuda" else "float32_tflops")
            tflops = known.get(key) or known.get("bfloat16_tflops")
            out[dtype] = {"gb_s": known["hbm_gb_s"], "tflops": tflops, "source": f"table ({key})"}
        else:
            out[dtype] = {"gb_s": measured["read_gb_s"], "tflops": measured["matmul_tflops"][dtype],
                          "source": "measured here (no table entry for this device)"}
    return out


# ---------------------------------------------------------------- report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(results: list[dict], s: Settings) -> str:
    head = ["model", "dtype", "verify", "logits rel", f"T={s.prefill_tokens} rel", "state rel",
            "agree (min/mean)"]
    head += [f"decode B={b} tok/s (BW)" for b in s.batches] + [f"prefill T={s.prefill_tokens} tok/s (FLOP/s)"]
    rows = [head]
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append([r["model"], r["dtype"], r.get("error") or r["skipped"]] + [""] * (len(head) - 3))
            continue
        v, p = r["verify"], r["speed"]
        errs = list(v["relative_errors"].values())
        agree = v["agreement_lengths"]
        row = [r["model"], r["dtype"], "PASS" if v["ok"] else "FAIL", f"{errs[0]:.1e}", f"{errs[1]:.1e}",
               f"{errs[2]:.1e}", f"{min(agree)}/{sum(agree) / len(agree):.0f} of {v['steps']}"]
        row += [f"{d['tok_s']:.0f} ({_pct(d['bandwidth_fraction'])})" for d in p["decode"].values()]
        pre = next(iter(p["prefill"].values()))
        row.append(f"{pre['tok_s']:.0f} ({_pct(pre['flops_fraction'])})")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model on this backend (CI smoke run)")
    ap.add_argument("--models", type=lambda v: v.split(","), help="presets [default: 130m,1.3b]")
    ap.add_argument("--dtypes", type=lambda v: v.split(","), help="[default: float32,bfloat16]")
    ap.add_argument("--steps", type=int, default=64, help="greedy tokens compared")
    ap.add_argument("--decode-tokens", type=int, default=128, help="steps per timed decode call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would start after this")
    ap.add_argument("--out", type=Path, default=Path("device-check-out"))
    ap.add_argument("--keep", action="store_true", help="keep the exported artifacts and weights")
    args = ap.parse_args(argv)
    s = settings(args)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    os.environ.setdefault("MAMBA2_AOT_CACHE_DIR", str(args.out / "xla-cache"))

    import jax

    import runtime
    from runtime.format.compat import current_platform

    platform = current_platform()
    device = jax.devices()[0]
    log(f"device: {device.device_kind} ({platform}), {jax.device_count()} device(s); jax {jax.__version__}")
    measured = probes(s)
    peak = peaks(device.device_kind, platform, measured)
    log(f"probes: read {measured['read_gb_s']:.0f} GB/s, matmul "
        + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in measured["matmul_tflops"].items()))
    results = []
    for name in s.models:
        cfg = model_config(name)
        limits = limits_for(s)
        weights = arrays = ref = None
        for dtype in s.dtypes:
            row = {"model": name, "dtype": dtype}
            results.append(row)
            if time.perf_counter() - t_start > s.budget_s:
                row["skipped"] = f"skipped: past the {s.budget_s:.0f} s budget"
                log(f"{name} {dtype}: {row['skipped']}")
                continue
            try:
                if weights is None:
                    log(f"{name}: seeded random weights, float32 CPU reference")
                    weights, arrays = write_weights(cfg, work)
                    ref = Reference(cfg, arrays, limits)
                art, row["export_s"] = export(cfg, dtype, platform, limits, work)
                log(f"{name} {dtype}: exported for {platform} in {row['export_s']:.1f} s")
                t0 = time.perf_counter()
                model = runtime.load(art, weights)
                row["load_s"] = time.perf_counter() - t0
                row["verify"] = verify(model, ref, dtype, s.steps, s.prefill_tokens)
                log(f"{name} {dtype}: verify {'PASS' if row['verify']['ok'] else 'FAIL'} "
                    f"{row['verify']['relative_errors']}, agreement {row['verify']['agreement_lengths']}")
                row["speed"] = measure(model, cfg, s, {"gb_s": peak[dtype]["gb_s"], "tflops": peak[dtype]["tflops"]})
                log(f"{name} {dtype}: decode " + ", ".join(f"{k} {v['tok_s']:.0f} tok/s"
                                                          for k, v in row["speed"]["decode"].items()))
                del model
            except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
                row["error"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log(f"{name} {dtype}: {row['error']}")
        del arrays, ref
    report = {
        "device": {"kind": device.device_kind, "platform": platform, "count": jax.device_count()},
        "versions": {"jax": jax.__version__, "mamba2-aot": runtime.__version__},
        "settings": dataclasses.asdict(s), "peaks": peak, "probes": measured,
        "criteria": {"tolerance": TOLERANCE, "first_tokens": FIRST_TOKENS, "near_tie": NEAR_TIE},
        "results": results, "elapsed_s": time.perf_counter() - t_start,
    }
    text = table(results, s)
    print(text)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=float))
    (args.out / "device_check.txt").write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(r.get("verify", {}).get("ok") for r in results if "skipped" not in r)
    log(f"{'PASS' if ok else 'FAIL'} in {report['elapsed_s']:.0f} s: {args.out / 'device_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
