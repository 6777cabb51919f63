"""Benchmark suite: the artifact runtime against the live JAX model, a host-driven decode loop and
HF transformers, beside this machine's measured roofline.

    .venv/bin/python scripts/bench.py                   # full run (20-40 minutes), -> bench-out/
    .venv/bin/python scripts/bench.py --quick --layers 2 --skip-hf --out /tmp/b   # smoke run

Everything is fp32 on the CPU with seeded random weights, the same for every system: they are
drawn once (`exporter.loading.load_params`), saved as an HF checkpoint directory
(`model.safetensors` + `config.json`, tied embeddings) that the runtime, the live model and
`Mamba2ForCausalLM.from_pretrained` all load. Each system runs in its own subprocess, one after
another (never concurrently); its peak RSS is that process's maximum resident set (wait4).

Measures (each timing repeated --repeats times, median reported; min/max and raw times in JSON):
  prefill   tok/s at T = 128, 512, 2048, batch 1, logits of the last token only (HF:
            `model(ids, logits_to_keep=1)`); compile/warm-up call excluded.
  decode    tok/s (total over the batch) at B = 1 and 8, for 64 and 512 new tokens after a
            16-token prompt, prefill excluded: runtime/live time the decode call alone (one
            on-device loop of n steps) from a precomputed prefill; hostloop times n calls of the
            jitted step with a host argmax each; HF times `generate` with a per-token streamer
            from the first new token to the last (n - 1 steps, so prefill and the first token's
            sampling are outside the clock).
  position  ms/token of each block of 64 new tokens up to 4096 (batch 1): runtime/live one
            decode call per block (budget 64, the state carried over); hostloop 64 step calls
            per block; HF per-token streamer timestamps within one `generate`. Only the
            runtime goes to --positions (4096); live (the same compiled functions), hostloop and
            HF stop at --slow-positions (1024) to save time.
  start     runtime only: wall from spawning a fresh interpreter to the first generated token
            (`runtime.load` + `generate(max_new_tokens=1)`); cold = empty MAMBA2_AOT_CACHE_DIR
            (compiles), warm = the same directory again (compile cache hit).
  roofline  read bandwidth (a 1.5 GiB float32 array: numpy sum on 1 thread and on every core,
            XLA sum, XLA matrix-vector product; best pass of the best method) and fp32 GEMM peak in XLA (2048^3 and the model's
            in_proj/out_proj at T=2048). Decode floor = (weight bytes + B x state bytes x 2) /
            bandwidth; prefill ceiling = 2 x non-embedding params x T / GEMM peak.
  big       the --big-model (1.3b) decode B=1 row: runtime (and HF unless --quick/--skip-hf).

Outputs in --out: bench.json (every raw number, machine, versions, settings, timestamps),
bench-table.txt (the printed table), bench-position.png (ms/token against position).
Targets from the issue are printed beside the numbers as met / not met, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("MAMBA2_BENCH_T0", str(time.time()))

from bench_lib.common import log, model_accounting, versions  # noqa: E402

ALL_SYSTEMS = ("runtime", "live", "hostloop", "hf")
ALL_MEASURES = ("prefill", "decode", "position", "start", "roofline", "big")
SLOW_SYSTEMS = ("live", "hostloop", "hf")  # position sweeps stop at --slow-positions


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(allowed):
    def parse(s: str) -> list[str]:
        names = [x.strip() for x in s.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}: choose from {', '.join(allowed)}")
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", default="130m", help="preset for every measure but `big` [130m]")
    p.add_argument("--big-model", default="1.3b", help="preset of the decode B=1 `big` row [1.3b]")
    p.add_argument("--layers", type=int, help="override num_hidden_layers of both models (smaller runs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: prefill T=128, decode B=1,8 x 16 tokens, positions to 256 (one "
                        "sweep), 2 repeats, a 256 MiB bandwidth array, one cold/warm start, no HF "
                        "for the big model")
    p.add_argument("--out", type=Path, default=REPO / "bench-out", help="output directory [bench-out/]")
    p.add_argument("--systems", type=_names(ALL_SYSTEMS), default=list(ALL_SYSTEMS),
                   help="comma list of runtime,live,hostloop,hf [all]")
    p.add_argument("--skip-hf", action="store_true", help="leave out HF transformers")
    p.add_argument("--only", type=_names(ALL_MEASURES), default=list(ALL_MEASURES),
                   help="comma list of prefill,decode,position,start,roofline,big [all]")
    p.add_argument("--skip-big", action="store_true", help="leave out the --big-model row")
    p.add_argument("--repeats", type=int, help="timed repetitions per measure (median) [3; quick 2]")
    p.add_argument("--position-repeats", type=int, help="position sweeps per system (median) [--repeats; quick 1]")
    p.add_argument("--prefill-tokens", type=_ints, help="prefill lengths [128,512,2048; quick 128]")
    p.add_argument("--decode-batches", type=_ints, help="decode batch sizes [1,8]")
    p.add_argument("--decode-tokens", type=_ints, help="new tokens per decode measure [64,512; quick 16]")
    p.add_argument("--big-decode-tokens", type=_ints, help="new tokens for the big row [64; quick 16]")
    p.add_argument("--positions", type=int, help="runtime's position sweep length [4096; quick 256]")
    p.add_argument("--slow-positions", type=int,
                   help="position sweep length of live, hostloop and hf [1024; quick 256]")
    p.add_argument("--block", type=int, default=64, help="tokens per position-sweep block [64]")
    p.add_argument("--start-repeats", type=int, help="cold and warm starts, each [--repeats; quick 1]")
    p.add_argument("--hf-threads", type=int, default=2, help="torch.set_num_threads for HF [2]")
    p.add_argument("--bandwidth-gib", type=float, help="bandwidth array size [1.5; quick 0.25]")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts seed [0]")
    p.add_argument("--keep-work", action="store_true", help="keep --out/work (weights, artifacts, caches)")
    # Internal: one subprocess per measured system.
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.repeats = a.repeats or (2 if q else 3)
    a.position_repeats = a.position_repeats or (1 if q else a.repeats)
    a.prefill_tokens = a.prefill_tokens or ([128] if q else [128, 512, 2048])
    a.decode_batches = a.decode_batches or [1, 8]
    a.decode_tokens = a.decode_tokens or ([16] if q else [64, 512])
    a.big_decode_tokens = a.big_decode_tokens or ([16] if q else [64])
    a.positions = a.positions or (256 if q else 4096)
    a.slow_positions = min(a.slow_positions or (256 if q else 1024), a.positions)
    a.start_repeats = a.start_repeats or (1 if q else a.repeats)
    a.bandwidth_gib = a.bandwidth_gib or (0.25 if q else 1.5)
    if a.skip_hf:
        a.systems = [s for s in a.systems if s != "hf"]
    if a.skip_big:
        a.only = [m for m in a.only if m != "big"]
    if min(a.repeats, a.position_repeats, a.start_repeats, a.block) < 1 or a.positions < a.block:
        p.error("--repeats, --position-repeats, --start-repeats and --block must be >= 1, "
                "--positions >= --block")
    return a


# ---------------------------------------------------------------------------------------------
# Worker side


def worker_main(a: argparse.Namespace) -> int:
    spec = json.loads(a.spec.read_text())
    task = a.worker
    try:
        if task == "prep":
            from bench_lib.systems import prep

            res = prep(spec)
        elif task == "roofline":
            from bench_lib.roofline import measure

            res = measure(spec)
        elif task == "hf":
            from bench_lib.systems import measure_hf

            res = measure_hf(spec)
        else:
            from bench_lib.systems import measure_jax

            res = measure_jax(task, spec)
        code = 0
    except Exception as e:  # noqa: BLE001 - recorded in the results, the run goes on
        traceback.print_exc()
        res, code = {"error": f"{type(e).__name__}: {e}"}, 1
    a.result.write_text(json.dumps(res, indent=1, default=str))
    return code


# ---------------------------------------------------------------------------------------------
# Orchestrator side


def run_worker(task: str, spec: dict, work: Path, env: dict | None = None) -> dict:
    """Run one task in a fresh interpreter; add its wall time and peak RSS (from wait4)."""
    tag = f"{spec['label']}-{task}"
    spec_path, result_path = work / f"{tag}-spec.json", work / f"{tag}-result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task,
           "--spec", str(spec_path), "--result", str(result_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if result_path.is_file():
        res = json.loads(result_path.read_text())
    else:
        res = {"error": f"worker exited with status {proc.returncode} and wrote no result"}
    res["worker_wall_s"] = wall
    res["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    if proc.returncode and "error" not in res:
        res["error"] = f"worker exited with status {proc.returncode}"
    if "error" in res:
        log(f"{task} FAILED: {res['error']}", spec["label"])
    return res


def first_token(artifact: Path, weights: Path, cache_dir: Path) -> dict:
    """Spawn a fresh interpreter: load + generate one token. Wall from spawn to the first token."""
    from bench_lib.systems import FIRST_TOKEN_SNIPPET

    env = {**os.environ, "MAMBA2_AOT_CACHE_DIR": str(cache_dir)}
    t_spawn = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FIRST_TOKEN_SNIPPET, str(artifact), str(weights)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST_TOKEN_JSON ")), None)
    if proc.returncode or line is None:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}", "process_wall_s": wall}
    d = json.loads(line.split(" ", 1)[1])
    return {"to_first_token_s": d["t_first"] - t_spawn, "process_wall_s": wall,
            "interpreter_start_s": d["t_start"] - t_spawn, "load_s": d["t_loaded"] - d["t_start"],
            "generate_s": d["t_first"] - d["t_loaded"], "tokens": d["tokens"]}


def measure_start(spec: dict, work: Path, repeats: int) -> dict:
    from bench_lib.common import stats

    res: dict = {"how": "wall from spawning `python -c` to the first token (runtime.load + "
                        "generate(max_new_tokens=1), 16-token prompt); cold: empty "
                        "MAMBA2_AOT_CACHE_DIR, warm: the directory a cold run filled"}
    runs = {"cold": [], "warm": []}
    cache = None
    for i in range(repeats):
        cache = work / f"start-cache-{spec['label']}-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        r = first_token(Path(spec["artifact_dir"]), Path(spec["weights_dir"]), cache)
        runs["cold"].append(r)
        log(f"cold start {i + 1}/{repeats}: " + (f"{r['to_first_token_s']:.2f}s to first token"
                                                 if "error" not in r else r["error"]), "start")
    for i in range(repeats):
        r = first_token(Path(spec["artifact_dir"]), Path(spec["weights_dir"]), cache)
        runs["warm"].append(r)
        log(f"warm start {i + 1}/{repeats}: " + (f"{r['to_first_token_s']:.2f}s to first token"
                                                 if "error" not in r else r["error"]), "start")
    for kind, rs in runs.items():
        ok = [r["to_first_token_s"] for r in rs if "error" not in r]
        res[kind] = {**(stats(ok) if ok else {"error": rs[-1].get("error")}), "runs": rs}
    return res


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["cpu_model"] = model
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001
        pass
    return info


VERSIONED = ("jax", "jaxlib", "numpy", "flax", "safetensors", "torch", "transformers", "matplotlib", "mamba2-aot")


def model_spec(name: str, layers: int | None, label: str, a, work: Path) -> dict:
    import dataclasses

    from exporter.config import PRESETS

    cfg = PRESETS[name]
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    label_full = name + (f"-L{layers}" if layers else "")
    base = work / label_full
    return {
        "label": label_full, "preset": name, "role": label, "cfg": cfg.to_dict(), "seed": a.seed,
        "weights_dir": str(base / "weights"), "artifact_dir": str(base / "artifact"),
        "limits": {"max_batch": 64, "max_prompt_tokens": 1 << 20, "max_new_tokens": max(4096, a.positions),
                   "max_stop_tokens": 8, "decode_block": max(*a.decode_tokens, a.block)},
        "repeats": a.repeats, "prompt_len": 16, "block": a.block,
        "prefill_T": a.prefill_tokens, "decode_B": a.decode_batches, "decode_n": a.decode_tokens,
        "hf_threads": a.hf_threads, "gemm_tokens": max(a.prefill_tokens),
        "bandwidth_bytes": int(a.bandwidth_gib * 2**30), "roofline_passes": 5,
    }


def token_agreement(systems: dict) -> dict | None:
    ref = (systems.get("runtime") or {}).get("tokens")
    if not ref:
        return None
    prefix = {}
    for s, r in systems.items():
        toks = (r or {}).get("tokens")
        if toks is None:
            prefix[s] = None
            continue
        k = 0
        while k < min(len(ref), len(toks)) and ref[k] == toks[k]:
            k += 1
        prefix[s] = k
    return {"checked": len(ref), "prefix": prefix, "tokens": {s: (r or {}).get("tokens") for s, r in systems.items()}}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)

    from bench_lib import report

    started = time.time()
    out = a.out.resolve()
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    hf_ok = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    systems = [s for s in a.systems if s != "hf" or hf_ok]
    notes = []
    if "hf" in a.systems and not hf_ok:
        notes.append("HF transformers / torch not importable: the hf column is empty")
    if a.layers:
        notes.append(f"--layers {a.layers}: models are cut to {a.layers} layers, so the issue's targets "
                     "(set for the full presets) do not apply to these numbers")
    if a.quick:
        notes.append("--quick: smoke-test settings, not a benchmark")

    spec = model_spec(a.model, a.layers, "main", a, work)
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": machine_info(), "versions": versions(VERSIONED),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                     if k not in ("worker", "spec", "result")}
                    | {"prompt_len": spec["prompt_len"], "prefill_T": a.prefill_tokens,
                       "decode_B": a.decode_batches, "decode_n": a.decode_tokens, "systems_run": systems,
                       "position_max": {s: (a.slow_positions if s in SLOW_SYSTEMS else a.positions)
                                        for s in systems}},
        "model": {"label": spec["label"], "preset": a.model, "config": spec["cfg"],
                  "accounting": model_accounting(spec["cfg"])},
        "systems": {}, "notes": notes,
    }
    json_path, table_path, png_path = out / "bench.json", out / "bench-table.txt", out / "bench-position.png"

    def save():
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    log(f"{spec['label']}: systems {','.join(systems)}; measures {','.join(a.only)}; out {out}")
    log(f"machine: {results['machine'].get('cpu_model')}, {results['machine']['cpu_count']} cpus, "
        f"load average {results['machine']['loadavg_start'][0]:.2f}")

    try:
        core = [m for m in ("prefill", "decode", "position") if m in a.only]
        need_prep = (core and systems) or "start" in a.only
        if need_prep:
            results["model"]["prep"] = run_worker("prep", {**spec, "export": True}, work)
            save()
        if "roofline" in a.only:
            results["roofline"] = run_worker("roofline", spec, work)
            save()
        if core:
            for s in systems:
                sspec = {**spec, "measures": core,
                         "position_max": a.slow_positions if s in SLOW_SYSTEMS else a.positions,
                         "position_repeats": a.position_repeats}
                log(f"--- {s} ---")
                results["systems"][s] = run_worker(s, sspec, work, {"MAMBA2_AOT_CACHE_DIR": str(work / "xla-cache")})
                save()
            results["token_agreement"] = token_agreement(results["systems"])
            if "hf" in results["systems"] and "error" not in results["systems"]["hf"]:
                notes.append("HF runs Mamba2's reference PyTorch path on CPU (the mamba_ssm / "
                             "causal_conv1d kernels it would use are CUDA-only)")
        if "start" in a.only:
            log("--- start to first token (runtime) ---")
            results["start"] = measure_start(spec, work, a.start_repeats)
            save()
        big_systems = [s for s in ("runtime", "hf") if s in systems and not (s == "hf" and a.quick)]
        if "big" in a.only and big_systems:
            bspec = model_spec(a.big_model, a.layers, "big", a, work)
            bspec.update(measures=["decode"], decode_B=[1], decode_n=a.big_decode_tokens)
            big = results["big"] = {"label": bspec["label"], "settings": {"decode_n": a.big_decode_tokens},
                                    "model": {"config": bspec["cfg"], "accounting": model_accounting(bspec["cfg"])},
                                    "systems": {}}
            if shutil.disk_usage(work).free < 3 * big["model"]["accounting"]["weight_bytes"]:
                notes.append(f"{bspec['label']}: skipped, not enough free disk for its weights")
            else:
                log(f"--- {bspec['label']} decode B=1: {','.join(big_systems)} ---")
                big["model"]["prep"] = run_worker("prep", {**bspec, "export": "runtime" in big_systems}, work)
                for s in big_systems:
                    big["systems"][s] = run_worker(s, bspec, work, {"MAMBA2_AOT_CACHE_DIR": str(work / "xla-cache")})
                    save()
                if not a.keep_work:  # the big weights are the largest files of the run
                    shutil.rmtree(Path(bspec["weights_dir"]).parent, ignore_errors=True)
    finally:
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["elapsed_s"] = time.time() - started
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        rows = report.build_rows(results)
        results["table"] = rows
        save()
        text = report.format_table(rows, results)
        table_path.write_text(text + "\n")
        try:
            report.plot(results, png_path)
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
            log(f"plot failed: {type(e).__name__}: {e}")
        if not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(text)
    print()
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {json_path}, {table_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
