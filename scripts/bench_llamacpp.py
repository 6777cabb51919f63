"""mamba2-aot against llama.cpp on the CPU: the same checkpoint, measured in one run, alternating.

    .venv/bin/python scripts/bench_llamacpp.py                   # full run -> bench-llamacpp-out/
    .venv/bin/python scripts/bench_llamacpp.py --quick           # smoke run (2 layers, 1 repeat)

Not run in CI. Needs cmake, a C/C++ compiler, network access to PyPI (once), and in this Python:
the project with its `bench` extra (torch, transformers, sentencepiece, pyyaml for llama.cpp's
converter; flax for the export).

Steps:
  1. llama.cpp: the pinned llama-cpp-python sdist (it vendors llama.cpp) is downloaded with pip
     and built with cmake into --cache-dir (default ~/.cache/mamba2-aot/llama.cpp; CPU only,
     GGML_NATIVE, no curl/openssl; llama-bench, llama-batched-bench, llama-quantize and our
     ids-in/ids-out greedy program bench_lib/llama_greedy.cpp). A later run on the same machine
     reuses the build. Nothing of llama.cpp is committed here.
  2. One seeded-random HF Mamba2ForCausalLM checkpoint (--model preset, model.safetensors +
     config.json, tied embeddings; the same as scripts/bench.py), exported to a cpu artifact
     with the exporter's default limits, and converted to GGUF f32 and f16 with llama.cpp's own
     convert_hf_to_gguf.py, q8_0 and q4_0 with llama-quantize (from f32).
  3. Token check: greedy tokens of one fixed prompt, llama.cpp f32 (and each quantization)
     against mamba2-aot.
  4. Measures, each sample a fresh process, systems alternating (order reversed every round),
     --repeats rounds, medians reported (every sample in the JSON):
       decode B=1   llama-bench -p 0 -n N (tg: one token per step, random ids, no sampling) /
                    ours: stream() after a P-token prompt, clock from the first block to the last
                    (prefill excluded; greedy sampling on the device included)
       decode B=8   llama-batched-bench -npp P -ntg N -npl 8 (S_TG) / ours as above with 8 rows
       prefill T    llama-bench -p T -n 0 / ours: time to first token minus a one-token decode call
       peak RSS     a process that loads the model and generates N tokens after a P-token prompt:
                    llama-greedy / runtime.load + generate; wait4's ru_maxrss. Ours with a warm
                    compile cache (a first, cold process is recorded separately).
     llama.cpp runs with --threads threads (default: every core); XLA uses every core.
     Each of our measures has its own compile cache directory, so that the shapes a previous
     process used (which the runtime prepares in the background) are the measure's own.

Outputs in --out: bench-llamacpp.json (every sample, settings, machine, versions, build) and
bench-llamacpp.txt (the printed table). Goals from the issue are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (HERE, REPO):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("MAMBA2_BENCH_T0", str(time.time()))

from bench_lib import llamacpp  # noqa: E402
from bench_lib.common import fmt, log, prompt_tokens, versions  # noqa: E402

QUANTS = ("f32", "f16", "q8_0", "q4_0")
MEASURES = ("tokens", "decode", "prefill", "rss")
OURS = "mamba2-aot"
# The issue's goals: ours / llama.cpp f32 (or an absolute bound), reported as met / not met.
GOALS = {
    "decode_B1": ("ours >= 1.1x llama.cpp f32", lambda ours, ref: ours >= 1.1 * ref),
    "decode_B8": ("ours >= 1.3x llama.cpp f32", lambda ours, ref: ours >= 1.3 * ref),
    "prefill_2048": ("ours >= 1.3x llama.cpp f32", lambda ours, ref: ours >= 1.3 * ref),
    "rss": ("ours <= 900 MiB", lambda ours, ref: ours <= 900),
}


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _names(allowed):
    def parse(s: str) -> list[str]:
        names = [x.strip() for x in s.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}: choose from {', '.join(allowed)}")
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="130m", help="preset of the checkpoint [130m]")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (smaller runs) [quick: 2]")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 layers, 1 repeat, 16 new tokens, prefill 128, all quantizations")
    p.add_argument("--out", type=Path, default=REPO / "bench-llamacpp-out", help="output directory")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="llama.cpp source and build cache [$MAMBA2_LLAMACPP_CACHE or ~/.cache/mamba2-aot/llama.cpp]")
    p.add_argument("--repeats", type=int, help="rounds of alternating samples (median) [5; quick 1]")
    p.add_argument("--only", type=_names(MEASURES), default=list(MEASURES),
                   help="comma list of tokens,decode,prefill,rss [all]")
    p.add_argument("--quants", type=_names(QUANTS), default=list(QUANTS),
                   help="llama.cpp weight types [f32,f16,q8_0,q4_0] (f32 is always converted)")
    p.add_argument("--decode-batches", type=_ints, help="decode batch sizes [1,8]")
    p.add_argument("--decode-tokens", type=int, help="new tokens per decode / RSS sample [128; quick 16]")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding [16]")
    p.add_argument("--prefill-tokens", type=_ints, help="prefill lengths [512,2048; quick 128]")
    p.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared [32]")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help=f"llama.cpp threads [{os.cpu_count()}: every core]")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build jobs [every core]")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts seed [0]")
    p.add_argument("--keep-work", action="store_true", help="keep --out/work (checkpoint, artifact, GGUF)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick

    def default(v, quick, full):
        return v if v is not None else (quick if q else full)

    a.layers = default(a.layers, 2, None)
    a.repeats = default(a.repeats, 1, 5)
    a.decode_batches = default(a.decode_batches, [1, 8], [1, 8])
    a.decode_tokens = default(a.decode_tokens, 16, 128)
    a.prefill_tokens = default(a.prefill_tokens, [128], [512, 2048])
    a.cache_dir = (a.cache_dir or llamacpp.default_cache_dir()).expanduser().resolve()
    if min(a.repeats, a.decode_tokens, a.prompt_len, a.check_tokens, a.threads, a.jobs) < 1:
        p.error("--repeats, --decode-tokens, --prompt-len, --check-tokens, --threads and --jobs must be >= 1")
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be >= 1")
    return a


# ---------------------------------------------------------------------------------------------
# Worker side (a fresh interpreter per task)


def worker_main(a: argparse.Namespace) -> int:
    spec = json.loads(a.spec.read_text())
    try:
        if a.worker == "prep":
            from bench_lib.systems import prep

            res = prep(spec)
        elif a.worker == "ours":
            from bench_lib.ours import run

            res = run(spec)
        else:
            raise ValueError(f"unknown worker {a.worker!r}")
        code = 0
    except Exception as e:  # noqa: BLE001 - recorded in the result, the run goes on
        if os.environ.get("MAMBA2_AOT_DEBUG"):
            traceback.print_exc()
        res, code = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}, 1
    a.result.write_text(json.dumps(res, indent=1, default=str))
    return code


def run_worker(task: str, spec: dict, work: Path, tag: str, env: dict | None = None) -> dict:
    """One task in a fresh interpreter; its result plus wall time and peak RSS (wait4)."""
    spec_path, result_path = work / f"{tag}-spec.json", work / f"{tag}-result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    r = llamacpp.run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", task,
                               "--spec", str(spec_path), "--result", str(result_path)], env)
    res = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if r["rc"] and "error" not in res:
        lines = [ln for ln in r["stderr_tail"].splitlines() if ln.strip()]
        res["error"] = f"worker exited with status {r['rc']}: {(lines[-1] if lines else '')[:300]}"
    res["wall_s"], res["peak_rss_mib"] = r["wall_s"], r["peak_rss_mib"]
    return res


# ---------------------------------------------------------------------------------------------
# Orchestrator


def model_cfg(a) -> dict:
    import dataclasses

    from exporter.config import PRESETS

    if a.model not in PRESETS:
        raise llamacpp.SetupError(f"unknown preset {a.model!r}: choose from {', '.join(PRESETS)}")
    cfg = PRESETS[a.model]
    if a.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=a.layers)
    return cfg.to_dict()


def machine_info() -> dict:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                                  if ln.startswith("model name")), None)
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["simd"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni", "amx_tile")
                        if f in flags]
    except OSError:
        pass
    return info


def plan(a) -> list[tuple[str, dict]]:
    """The measures of one round: (key, parameters)."""
    out = []
    if "decode" in a.only:
        out += [(f"decode_B{B}", {"kind": "decode", "batch": B}) for B in a.decode_batches]
    if "prefill" in a.only:
        out += [(f"prefill_{T}", {"kind": "prefill", "prompt_tokens": T}) for T in a.prefill_tokens]
    if "rss" in a.only:
        out.append(("rss", {"kind": "rss"}))
    return out


def run_llama(bins: dict, gguf: Path, m: dict, a) -> dict:
    kind = m["kind"]
    if kind == "decode" and m["batch"] == 1:
        return llamacpp.bench_decode_b1(bins, gguf, a.decode_tokens, a.threads)
    if kind == "decode":
        return llamacpp.bench_decode_batched(bins, gguf, m["batch"], a.prompt_len, a.decode_tokens, a.threads)
    if kind == "prefill":
        return llamacpp.bench_prefill(bins, gguf, m["prompt_tokens"], a.threads)
    prompt = prompt_tokens(a.vocab_llama, 1, a.prompt_len, a.seed)[0].tolist()
    r = llamacpp.greedy(bins, gguf, prompt, a.decode_tokens, a.threads)
    if "error" not in r:
        r["value"] = r["peak_rss_mib"]
    return r


def run_ours(key: str, m: dict, base: dict, work: Path, rnd: int) -> dict:
    spec = {**base, "task": m["kind"], "n": base["decode_tokens"]}
    if m["kind"] == "decode":
        spec["batch"] = m["batch"]
    if m["kind"] == "prefill":
        spec["prompt_tokens"] = m["prompt_tokens"]
    env = {"MAMBA2_AOT_CACHE_DIR": str(work / f"xla-cache-{key}")}
    r = run_worker("ours", spec, work, f"ours-{key}-{rnd}", env)
    if "error" not in r and m["kind"] == "rss":
        r["value"] = r["peak_rss_mib"]
    return r


def value(sample: dict):
    if "error" in sample:
        return None
    return sample.get("value", sample.get("tok_s"))


def summarize(samples: list[dict]) -> dict:
    vals = [v for v in map(value, samples) if v is not None]
    if not vals:
        return {"median": None, "errors": [s.get("error") for s in samples]}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals, "errors": [s["error"] for s in samples if "error" in s]}


def agreement(ref: list[int] | None, toks: list[int] | None) -> int | None:
    if ref is None or toks is None:
        return None
    k = 0
    while k < min(len(ref), len(toks)) and ref[k] == toks[k]:
        k += 1
    return k


def table(results: dict) -> str:
    systems = [f"llama.cpp {q}" for q in results["settings"]["quants"]] + [OURS]
    s = results["settings"]
    labels = {f"decode_B{B}": f"decode B={B} tok/s" + (" (total)" if B > 1 else "") for B in s["decode_batches"]}
    labels |= {f"prefill_{T}": f"prefill {T} tok/s" for T in s["prefill_tokens"]}
    labels |= {"rss": "peak RSS MiB (load + generate)"}
    head = ["", *systems, "ours / llama.cpp f32", "goal"]
    rows = [head, ["---"] * len(head)]
    for key, summary in results["measures"].items():
        med = {sysname: summary.get(sysname, {}).get("median") for sysname in systems}
        ref, ours = med.get("llama.cpp f32"), med.get(OURS)
        ratio = ours / ref if ours is not None and ref else None
        goal = ""
        if not s["goals_apply"]:
            goal = "n/a (--layers)" if key in GOALS else ""
        elif key in GOALS and ours is not None and (ref is not None or key == "rss"):
            desc, ok = GOALS[key]
            goal = f"{desc}: {'met' if ok(ours, ref) else 'not met'}"
        rows.append([labels.get(key, key), *(fmt(med[x]) for x in systems),
                     f"{ratio:.2f}x" if ratio is not None else "-", goal])
    if results.get("rss_cold") is not None:
        rows.append(["peak RSS MiB, cold compile cache", *("" for _ in systems[:-1]),
                     fmt(results["rss_cold"]), "", ""])
    tc = results.get("token_check")
    if tc:
        n = tc["checked"]
        rows.append([f"greedy tokens = ours (of {n})",
                     *(str(tc["prefix"].get(x, "-")) if tc["prefix"].get(x) is not None else "-" for x in systems[:-1]),
                     "ref", "", "f32 must agree: " + ("yes" if tc["prefix"].get("llama.cpp f32") == n else "NO")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    m, st = results["machine"], results["settings"]
    foot = (f"{results['model']['label']}, fp32 checkpoint; llama.cpp {results['llama_cpp']['sdist']} "
            f"with {st['threads']} threads; medians of {st['repeats']} alternating rounds; "
            f"{st['prompt_len']}-token prompt, {st['decode_tokens']} new tokens; "
            f"{m.get('cpu_model')} ({m.get('cpu_count')} cpus, {', '.join(m.get('simd', []))})")
    notes = "".join(f"\nnote: {n}" for n in results.get("notes", []))
    return "\n".join(lines) + "\n\n" + foot + notes


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    try:
        return orchestrate(a)
    except llamacpp.SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def orchestrate(a) -> int:
    started = time.time()
    out = a.out.resolve()
    work = out / "work"
    llamacpp.toolchain()  # missing tools or packages: one error line before anything is written
    llamacpp.check_converter_imports()
    cfg = model_cfg(a)
    work.mkdir(parents=True, exist_ok=True)
    label = a.model + (f"-L{a.layers}" if a.layers else "")
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "argv": sys.argv[1:], "machine": machine_info(), "versions": versions(("jax", "jaxlib", "numpy", "torch", "transformers", "mamba2-aot")),
        "settings": {"repeats": a.repeats, "quants": a.quants, "decode_batches": a.decode_batches,
                     "decode_tokens": a.decode_tokens, "prompt_len": a.prompt_len,
                     "prefill_tokens": a.prefill_tokens, "threads": a.threads, "seed": a.seed,
                     "check_tokens": a.check_tokens, "quick": a.quick, "only": a.only,
                     "goals_apply": a.model == "130m" and not a.layers},
        "model": {"label": label, "preset": a.model, "config": cfg},
        "samples": {}, "measures": {}, "notes": [],
    }
    if a.quick:
        results["notes"].append("--quick: smoke-test settings (2 layers, 1 repeat), not a benchmark")
    if a.layers:
        results["notes"].append(f"--layers {a.layers}: the issue's goals (set for the full 130m) do not apply")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        results["notes"].append(f"load average {load:.1f} on {cpus} cpus at the start: the machine is busy, so "
                                "these numbers are not a benchmark (llama.cpp's spinning threads suffer most)")
    json_path, table_path = out / "bench-llamacpp.json", out / "bench-llamacpp.txt"

    def save():
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    text = None
    try:
        build = llamacpp.build(a.cache_dir, a.jobs)
        bins = build["bin"]
        results["llama_cpp"] = build

        base = work / label
        ckpt, art = base / "checkpoint", base / "artifact"
        log(f"checkpoint + cpu artifact for {label} (seeded random weights, seed {a.seed})")
        prep = run_worker("prep", {"label": label, "cfg": cfg, "seed": a.seed, "weights_dir": str(ckpt),
                                   "artifact_dir": str(art), "limits": {}, "export": True}, work, "prep")
        if "error" in prep:
            raise llamacpp.SetupError(f"preparing the checkpoint and artifact failed: {prep['error']}")
        results["model"]["prep"] = prep
        ggufs = llamacpp.convert(Path(build["src"]), bins, ckpt, base / "gguf", a.quants, work)
        results["gguf"] = {q: {"path": str(p), "bytes": p.stat().st_size} for q, p in ggufs.items()}

        base_spec = {"artifact_dir": str(art), "weights_dir": str(ckpt), "vocab": cfg["vocab_size"],
                     "seed": a.seed, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens}
        # The prompt ids must exist in both vocabularies (the GGUF's comes from the converter).
        probe = llamacpp.greedy(bins, ggufs["f32"], [1], 1, a.threads)
        if "error" in probe:
            raise llamacpp.SetupError(f"llama.cpp cannot run the f32 GGUF: {probe['error']}")
        a.vocab_llama = min(int(probe["n_vocab"]), cfg["vocab_size"])
        base_spec["vocab"] = a.vocab_llama
        save()

        if "tokens" in a.only:
            prompt = prompt_tokens(a.vocab_llama, 1, a.prompt_len, a.seed + 1)[0].tolist()
            ours = run_worker("ours", {**base_spec, "task": "tokens", "prompt": prompt, "n": a.check_tokens},
                              work, "ours-tokens", {"MAMBA2_AOT_CACHE_DIR": str(work / "xla-cache-tokens")})
            toks = {OURS: ours.get("tokens")}
            for q, g in ggufs.items():
                toks[f"llama.cpp {q}"] = llamacpp.greedy(bins, g, prompt, a.check_tokens, a.threads).get("tokens")
            tc = {"prompt": prompt, "checked": a.check_tokens, "tokens": toks,
                  "prefix": {k: agreement(toks[OURS], v) for k, v in toks.items() if k != OURS}}
            if "error" in ours:
                tc["error"] = ours["error"]
            results["token_check"] = tc
            f32 = tc["prefix"].get("llama.cpp f32")
            log(f"greedy tokens: llama.cpp f32 agrees with ours on {f32}/{a.check_tokens}"
                + ("" if f32 == a.check_tokens else f" (ours {toks[OURS]}, llama.cpp {toks.get('llama.cpp f32')})"))
            save()

        measures = plan(a)
        if any(m["kind"] == "rss" for _, m in measures):
            cold = run_ours("rss", {"kind": "rss"}, base_spec, work, -1)  # fills its compile cache
            results["rss_cold"] = cold.get("peak_rss_mib") if "error" not in cold else None
            results["samples"]["rss_cold"] = cold
            log(f"{OURS} rss, cold compile cache: {fmt(results['rss_cold'])} MiB")
        systems = [f"llama.cpp {q}" for q in a.quants] + [OURS]
        for rnd in range(a.repeats):
            order = systems if rnd % 2 == 0 else systems[::-1]
            for key, m in measures:
                for sysname in order:
                    if sysname == OURS:
                        r = run_ours(key, m, base_spec, work, rnd)
                    else:
                        r = run_llama(bins, ggufs[sysname.split()[-1]], m, a)
                    results["samples"].setdefault(key, {}).setdefault(sysname, []).append(r)
                    v = value(r)
                    unit = "MiB" if m["kind"] == "rss" else "tok/s"
                    log(f"round {rnd + 1}/{a.repeats} {key} {sysname}: "
                        + (f"{v:.1f} {unit}" if v is not None else f"FAILED: {r.get('error')}"))
                save()
        for key, per in results["samples"].items():
            if key != "rss_cold":
                results["measures"][key] = {s: summarize(v) for s, v in per.items()}
    except KeyboardInterrupt:
        results["notes"].append("interrupted")
        raise
    finally:
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["elapsed_s"] = time.time() - started
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        if "llama_cpp" in results and results["measures"]:
            text = table(results)
            results["table"] = text
            table_path.write_text(text + "\n")
        save()
        if not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if text:
        print()
        print(text)
        print()
    failed = [f"{k} {s}" for k, per in results["measures"].items() for s, v in per.items() if v.get("errors")]
    if failed:
        log(f"some samples failed: {', '.join(failed)} (errors in {json_path})")
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {json_path}, {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
