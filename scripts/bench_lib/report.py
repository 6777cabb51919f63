"""The printed table, the issue's targets (reported, never asserted) and the position plot."""

from __future__ import annotations

import math

from bench_lib.common import decode_ceiling_tok_s, fmt, prefill_ceiling_tok_s

SYSTEMS = ("runtime", "live", "hostloop", "hf")

# The targets: (key, description, predicate on the runtime's number).
TARGETS = {
    "decode_b1": ("decode B=1 >= 36 tok/s", lambda v: v >= 36.0),
    "decode_b8": ("decode B=8 >= 150 tok/s total", lambda v: v >= 150.0),
    "prefill_2048": ("prefill T=2048 >= 400 tok/s", lambda v: v >= 400.0),
    "position": ("ms/token at 4096 within 5% of position 64", lambda v: abs(v - 1.0) <= 0.05),
    "warm_start": ("warm start to first token <= 2 s", lambda v: v <= 2.0),
    "big_decode_b1": ("1.3b decode B=1 >= 3.5 tok/s", lambda v: v >= 3.5),
}


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _status(key: str, value) -> tuple[str, str]:
    desc, ok = TARGETS[key]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return desc, "n/a"
    return desc, "met" if ok(value) else "not met"


def build_rows(results: dict) -> list[dict]:
    """One row per measure: values per system, runtime/HF, roofline, % of roofline, target."""
    systems = results.get("systems", {})
    acct = _get(results, "model", "accounting") or {}
    roof = results.get("roofline") or {}
    bw = _get(roof, "bandwidth", "gb_s")
    peak = _get(roof, "gemm", "gflop_s")
    settings = results["settings"]
    rows: list[dict] = []

    def row(measure, unit, values, roofline=None, target=None, lower_is_better=False, note=None,
            ratio=True):
        if all(v is None for v in values.values()):  # not measured in this run
            return
        rt, hf = values.get("runtime"), values.get("hf")
        r = {"measure": measure, "unit": unit, "values": values,
             "runtime_over_hf": rt / hf if ratio and rt is not None and hf else None,
             "roofline": roofline,
             "pct_of_roofline": (100 * (roofline / rt if lower_is_better else rt / roofline))
             if rt and roofline else None,
             "target": None, "status": None, "note": note}
        if target is not None:
            r["target"], r["status"] = _status(*target)
        rows.append(r)

    for T in settings["prefill_T"]:
        vals = {s: _get(systems, s, "prefill", str(T), "tok_s") for s in SYSTEMS}
        ceil = prefill_ceiling_tok_s(acct, peak) if acct and peak else None
        tgt = ("prefill_2048", vals["runtime"]) if T == 2048 else None
        row(f"prefill T={T}", "tok/s", vals, ceil, tgt)

    for B in settings["decode_B"]:
        for n in settings["decode_n"]:
            vals = {s: _get(systems, s, "decode", f"B{B}_n{n}", "tok_s") for s in SYSTEMS}
            ceil = decode_ceiling_tok_s(acct, B, bw) if acct and bw else None
            tgt = {1: "decode_b1", 8: "decode_b8"}.get(B)
            row(f"decode B={B} n={n}", "tok/s", vals, ceil, (tgt, vals["runtime"]) if tgt else None)

    # ms/token against position (O(1) decode): first block, 1024 where measured, last block.
    pos = {s: _get(systems, s, "position") for s in SYSTEMS}
    rt_pos = pos.get("runtime")
    if any(pos.values()):
        marks = sorted({p for s, d in pos.items() if d for p in (d["positions"][0], d["positions"][-1])}
                       | ({1024} if any(d and 1024 in d["positions"] for d in pos.values()) else set()))
        floor_ms = 1e3 / decode_ceiling_tok_s(acct, 1, bw) if acct and bw else None
        for p in marks:
            vals = {s: (d["ms_per_token"][d["positions"].index(p)] if d and p in d["positions"] else None)
                    for s, d in pos.items()}
            row(f"ms/token at position {p}", "ms", vals, floor_ms, lower_is_better=True)
        ratios = {s: (d["ms_per_token"][-1] / d["ms_per_token"][0] if d else None) for s, d in pos.items()}
        note = ", ".join(f"{s} {d['positions'][-1]}/{d['positions'][0]}" for s, d in pos.items() if d)
        span = f" ({rt_pos['positions'][-1]}/{rt_pos['positions'][0]})" if rt_pos else ""
        row(f"ms/token last/first block{span}", "ratio", ratios, None,
            ("position", ratios["runtime"]) if rt_pos else None, note=f"positions {note}", ratio=False)
        row("ms/token slope", "ms per 1k pos", {s: (d["slope_ms_per_1k_positions"] if d else None)
                                                for s, d in pos.items()}, ratio=False)

    rss = {s: _get(systems, s, "peak_rss_mib") for s in SYSTEMS}
    if any(v is not None for v in rss.values()):
        row("peak RSS", "MiB", rss)

    start = results.get("start")
    if start:
        row("start to first token, cold", "s", {"runtime": _get(start, "cold", "median_s")})
        warm = _get(start, "warm", "median_s")
        row("start to first token, warm", "s", {"runtime": warm}, target=("warm_start", warm))

    big = results.get("big")
    if big:
        bsys = big.get("systems", {})
        bacct = _get(big, "model", "accounting")
        for n in big["settings"]["decode_n"]:
            vals = {s: _get(bsys, s, "decode", f"B1_n{n}", "tok_s") for s in SYSTEMS}
            ceil = decode_ceiling_tok_s(bacct, 1, bw) if bacct and bw else None
            row(f"{big['label']} decode B=1 n={n}", "tok/s", vals, ceil, ("big_decode_b1", vals["runtime"]))
        rss = {s: _get(bsys, s, "peak_rss_mib") for s in SYSTEMS}
        if any(v is not None for v in rss.values()):
            row(f"{big['label']} peak RSS", "MiB", rss)

    agree = results.get("token_agreement")
    if agree:
        rows.append({"measure": f"greedy tokens = runtime's (first {agree['checked']})", "unit": "tokens",
                     "values": {s: (f"{v}/{agree['checked']}" if v is not None else None)
                                for s, v in agree["prefix"].items()},
                     "runtime_over_hf": None, "roofline": None, "pct_of_roofline": None,
                     "target": None, "status": None, "note": "matching prefix of the B=1 decode"})
    return rows


def format_table(rows: list[dict], results: dict) -> str:
    present = [s for s in SYSTEMS if any(r["values"].get(s) is not None for r in rows)]
    head = ["measure", "unit", *present, "runtime/HF", "roofline", "% roof", "target", "status"]
    lines = []
    for r in rows:
        lines.append([r["measure"], r["unit"], *(fmt(r["values"].get(s)) for s in present),
                      fmt(r["runtime_over_hf"]) if r["runtime_over_hf"] is not None else "-",
                      fmt(r["roofline"]), f"{r['pct_of_roofline']:.0f}%" if r["pct_of_roofline"] else "-",
                      r["target"] or "", r["status"] or ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) if i < 2 or i >= len(head) - 2 else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    roof = results.get("roofline") or {}
    bw, gemm = roof.get("bandwidth"), roof.get("gemm")
    if bw or gemm:
        out.append("")
    if bw:
        out.append(f"machine read bandwidth {bw['gb_s']:.1f} GB/s ({bw['best_method']}; numpy 1 thread "
                   f"{bw['numpy_1thread_gb_s']:.1f}, numpy {bw['numpy_threads']} threads "
                   f"{bw['numpy_threads_gb_s']:.1f}, XLA sum {bw['xla_sum_gb_s']:.1f}, XLA matvec "
                   f"{bw['xla_matvec_gb_s']:.1f})")
    if gemm:
        out.append(f"machine fp32 GEMM peak {gemm['gflop_s']:.1f} GFLOP/s (XLA, " + ", ".join(
            f"{k} {v['gflop_s']:.1f}" for k, v in gemm["shapes"].items()) + ")")
    out += [
        "roofline: decode = tok/s if a step only streamed the weights once + each row's state in and out "
        "(bytes / bandwidth); prefill = tok/s at the GEMM peak for 2 x non-embedding params FLOPs/token; "
        "ms/token rows: the B=1 decode floor.",
        "runtime/HF: ratio of the values (tok/s: higher is better for the runtime; ms, MiB, s: lower).",
    ]
    notes = results.get("notes") or []
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"runtime": "tab:blue", "live": "tab:green", "hostloop": "tab:orange", "hf": "tab:red"}
    labels = {"runtime": "artifact runtime (on-device loop)", "live": "live JAX (jit, on-device loop)",
              "hostloop": "JAX host loop (one call per token)", "hf": "HF transformers (PyTorch)"}
    drawn = 0
    for s in SYSTEMS:
        d = _get(results, "systems", s, "position")
        if not d:
            continue
        ax.plot(d["positions"], d["ms_per_token"], marker=".", color=colors[s], label=labels[s])
        ax.fill_between(d["positions"], d["min"], d["max"], color=colors[s], alpha=0.15, linewidth=0)
        drawn += 1
    acct = _get(results, "model", "accounting")
    bw = _get(results, "roofline", "bandwidth", "gb_s")
    if acct and bw:
        ax.axhline(1e3 / decode_ceiling_tok_s(acct, 1, bw), color="gray", linestyle="--",
                   label=f"bandwidth floor ({bw:.1f} GB/s)")
    m = results["model"]
    ax.set_xlabel("position (tokens generated, after a %d-token prompt)" % results["settings"]["prompt_len"])
    ax.set_ylabel("ms / token (per block of %d, batch 1)" % results["settings"]["block"])
    ax.set_title(f"Mamba-2 {m['label']} decode cost against position, fp32 CPU "
                 f"({results['machine']['cpu_count']} cores)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if drawn or (acct and bw):
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
