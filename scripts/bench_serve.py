"""Serving benchmark: concurrent streaming clients against a local `mamba2-aot serve` (loopback).

    python scripts/bench_serve.py --model 130m --out bench-serve/          # exports 130m, random weights
    python scripts/bench_serve.py --artifact artifacts/130m --weights ./ckpt --out bench-serve/
    python scripts/bench_serve.py --quick --out /tmp/bs                    # smoke run: a tiny model

For each concurrency c in --clients (default 1, 4, 8, 16): c clients start together, each sends
--requests-per-client streaming completions one after another (--prompt-tokens random token
ids, --max-tokens new tokens, ignore_eos, temperature --temperature with a seed per request).
Then the same c x R requests are sent one at a time. Measured per scenario: total generated
tok/s (tokens / wall time), TTFT p50/p99 (send -> first chunk with tokens), time per output
token p50/p99 (per request: (last chunk - first chunk) / (tokens - 1)), failed requests; and
the interleave scenario: one client decoding while a --long-prompt-tokens prompt is admitted
(its TTFT, and the decoding client's longest gap between chunks against its median gap).

An unmeasured round at 1 and at the most clients comes first. Prints a table and writes bench-serve.json (every request's timings, the settings, the machine).
The goal (8 clients >= 2.5x the 1-client total tok/s, no failed request) is printed as met /
not met, never asserted. Bounded: --max-seconds for the whole run, --request-timeout per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOAL_CLIENTS, GOAL_RATIO = 8, 2.5


def log(msg: str) -> None:
    print(f"[bench-serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, help="an exported artifact (default: export --model into --out/work)")
    p.add_argument("--weights", type=Path, help="its weights [default: seeded random]")
    p.add_argument("--model", default="130m", help="preset to export when no --artifact [130m]")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny model, few short requests")
    p.add_argument("--out", type=Path, default=Path("bench-serve"))
    p.add_argument("--clients", default=None, help="concurrencies, comma-separated [1,4,8,16; quick: 1,4]")
    p.add_argument("--requests-per-client", type=int, default=None, help="[2; quick: 2]")
    p.add_argument("--prompt-tokens", type=int, default=None, help="[128; quick: 16]")
    p.add_argument("--max-tokens", type=int, default=None, help="[128; quick: 16]")
    p.add_argument("--long-prompt-tokens", type=int, default=None, help="interleave scenario [2048; quick: 100]")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slots", type=int, default=None, help="server --slots [16; quick: 4]")
    p.add_argument("--block", type=int, default=None, help="server --block [16; quick: 8]")
    p.add_argument("--prefill-chunk", type=int, default=None, help="server --prefill-chunk [1024; quick: 64]")
    p.add_argument("--max-seconds", type=float, default=None, help="whole-run bound [1800; quick: 300]")
    p.add_argument("--request-timeout", type=float, default=600.0)
    a = p.parse_args(argv)
    quick = a.quick
    for name, full, small in (("clients", "1,4,8,16", "1,4"), ("requests_per_client", 2, 2),
                              ("prompt_tokens", 128, 16), ("max_tokens", 128, 16), ("long_prompt_tokens", 2048, 100),
                              ("slots", 16, 4), ("block", 16, 8), ("prefill_chunk", 1024, 64),
                              ("max_seconds", 1800.0, 300.0)):
        if getattr(a, name) is None:
            setattr(a, name, small if quick else full)
    a.clients = [int(c) for c in str(a.clients).split(",") if c.strip()]
    return a


# ------------------------------------------------------------------ the model and the server


def export(a, work: Path) -> Path:
    """The artifact to serve: --artifact, or --model (a tiny config with --quick) exported here."""
    if a.artifact is not None:
        return a.artifact
    import jax.numpy as jnp

    from exporter.artifact import write_artifact
    from exporter.config import PRESETS, Mamba2Config
    from exporter.functions import ModelFunctions
    from runtime.format.manifest import Limits

    if a.quick:
        cfg = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=16, head_dim=16,
                           chunk_size=16, name="bench-tiny")
    else:
        cfg = PRESETS[a.model]
    longest = max(a.prompt_tokens, a.long_prompt_tokens)
    limits = Limits(max_batch=max(16, a.slots), max_prompt_tokens=max(2048, longest),
                    max_new_tokens=max(4096, 4 * a.max_tokens), decode_block=max(16, a.block))
    path = work / f"artifact-{cfg.name}"
    log(f"exporting {cfg.name} to {path}")
    write_artifact(ModelFunctions(cfg, jnp.float32, limits), ["cpu"], path, force=True)
    return path


class Server:
    """`mamba2-aot serve` on a free 127.0.0.1 port; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, a, artifact: Path, log_path: Path):
        cmd = [sys.executable, "-m", "runtime.tools.cli", "serve", str(artifact), "--port", "0",
               "--slots", str(a.slots), "--block", str(a.block), "--prefill-chunk", str(a.prefill_chunk),
               "--max-queue", "1024"]
        cmd += ["--weights", str(a.weights) if a.weights is not None else "random"]
        self.args = cmd[3:]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = None

    def _find_url(self) -> str | None:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log_path.read_text())
        return m.group(1) if m else None

    def wait_ready(self, timeout: float) -> float:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: see its log")
            self.url = self.url or self._find_url()
            try:
                if self.url and httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout:.0f}s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


# ------------------------------------------------------------------ clients


async def one_request(client, body: dict, timeout: float) -> dict:
    """Stream one completion: timings (monotonic seconds) and token count, or the error."""
    rec = {"sent": time.monotonic(), "first": None, "last": None, "tokens": 0, "chunks": 0, "error": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["error"] = chunk["error"]["message"]
                    break
                n = sum(len(c.get("token_ids", [])) for c in chunk["choices"])
                if n:
                    now = time.monotonic()
                    rec["first"] = rec["first"] or now
                    rec["last"] = now
                    rec["tokens"] += n
                    rec["chunks"] += 1
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        rec["error"] = f"{type(e).__name__}: {e}"
    if rec["error"] is None and rec["tokens"] != body["max_tokens"]:
        rec["error"] = f"got {rec['tokens']} of {body['max_tokens']} tokens"
    return rec


def requests_for(a, clients: int, vocab: int, seed: int) -> list[list[dict]]:
    """One list of request bodies per client."""
    rng = np.random.default_rng(seed)
    return [[{"prompt": rng.integers(1, vocab, a.prompt_tokens).tolist(), "max_tokens": a.max_tokens,
              "temperature": a.temperature, "seed": int(rng.integers(0, 2**31)), "ignore_eos": True,
              "stream": True, "return_token_ids": True} for _ in range(a.requests_per_client)] for _ in range(clients)]


async def run_clients(url: str, per_client: list[list[dict]], timeout: float) -> tuple[list[dict], float]:
    import httpx

    async def client_loop(client, bodies):
        return [await one_request(client, b, timeout) for b in bodies]

    limits = httpx.Limits(max_connections=len(per_client) + 4, max_keepalive_connections=len(per_client) + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        t0 = time.monotonic()
        results = await asyncio.gather(*[client_loop(client, b) for b in per_client])
        wall = time.monotonic() - t0
    return [r for rs in results for r in rs], wall


def summarize(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    tokens = sum(r["tokens"] for r in records)
    return {"requests": len(records), "failed": len(records) - len(ok), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else None, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "errors": sorted({str(r["error"]) for r in records if r["error"]})[:5]}


def warm_up(url: str, a, vocab: int) -> None:
    """Unmeasured rounds at 1 client and at the most clients: first-use work (small array
    programs for each batch size) stays out of the numbers."""
    for c in sorted({1, max(a.clients)}):
        per_client = [bodies[:1] for bodies in requests_for(a, c, vocab, seed=1000 + c)]
        for (body,) in per_client:
            body["max_tokens"] = min(body["max_tokens"], 2 * a.block)
        asyncio.run(run_clients(url, per_client, a.request_timeout))


async def interleave(url: str, a, vocab: int) -> dict:
    """One client decoding; a long prompt admitted meanwhile: its TTFT, the decoder's gaps."""
    import httpx

    rng = np.random.default_rng(99)
    runner = {"prompt": [1, 2, 3], "max_tokens": max(256, 8 * a.block), "temperature": 0.0, "ignore_eos": True,
              "stream": True, "return_token_ids": True}
    long = {"prompt": rng.integers(1, vocab, a.long_prompt_tokens).tolist(), "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    times: list[float] = []

    async with httpx.AsyncClient(base_url=url, timeout=a.request_timeout) as client:
        async def run_runner():
            async with client.stream("POST", "/v1/completions", json=runner) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.monotonic())

        task = asyncio.ensure_future(run_runner())
        while len(times) < 4 and not task.done():
            await asyncio.sleep(0.005)
        t_long = time.monotonic()
        rec = await one_request(client, long, a.request_timeout)
        await task
    gaps = np.diff(times)
    during = [g for t, g in zip(times[1:], gaps) if t_long <= t and (rec["first"] is None or t - g <= rec["first"])]
    return {"long_prompt_tokens": a.long_prompt_tokens, "long_ttft_s": None if rec["first"] is None else
            rec["first"] - rec["sent"], "long_error": rec["error"], "runner_gap_median_s": float(np.median(gaps)),
            "runner_gap_max_during_admission_s": float(max(during)) if during else None,
            "runner_chunks_during_admission": len(during)}


# ------------------------------------------------------------------ the run


def fmt(v, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}{unit}"


def table(rows: list[dict]) -> str:
    head = ("clients", "requests", "tok/s", "x 1-client", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
            "failed", "one at a time tok/s", "x one at a time")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    base = next((r["concurrent"]["tok_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        c, s = r["concurrent"], r["sequential"]
        lines.append(" | ".join([
            str(r["clients"]), str(c["requests"]), fmt(c["tok_s"]),
            fmt(c["tok_s"] / base if base and c["tok_s"] else None, "x", digits=2),
            fmt(c["ttft_p50_s"], " ms", 1e3), fmt(c["ttft_p99_s"], " ms", 1e3),
            fmt(c["tpot_p50_s"], " ms", 1e3), fmt(c["tpot_p99_s"], " ms", 1e3), str(c["failed"] + s["failed"]),
            fmt(s["tok_s"]), fmt(c["tok_s"] / s["tok_s"] if s["tok_s"] and c["tok_s"] else None, "x", digits=2)]))
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    work.mkdir(exist_ok=True)
    artifact = export(a, work)
    sys.path.insert(0, str(REPO))
    from runtime.format.manifest import read_manifest

    vocab = read_manifest(artifact).limits.vocab_size
    server = Server(a, artifact, a.out / "server.log")
    from bench_lib.common import versions

    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:], "artifact": str(artifact),
              "server_args": server.args, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "python": platform.python_version()},
              "versions": versions(("jax", "jaxlib", "numpy", "fastapi", "uvicorn", "httpx", "mamba2-aot")),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "scenarios": [], "skipped": []}
    try:
        result["ready_s"] = server.wait_ready(min(900.0, a.max_seconds))
        log(f"server ready in {result['ready_s']:.1f}s at {server.url}")
        warm_up(server.url, a, vocab)
        for i, c in enumerate(a.clients):
            if time.monotonic() - t_start > a.max_seconds:
                result["skipped"].append(c)
                continue
            per_client = requests_for(a, c, vocab, seed=i)
            records, wall = asyncio.run(run_clients(server.url, per_client, a.request_timeout))
            concurrent = summarize(records, wall)
            seq_records, seq_wall = asyncio.run(run_clients(server.url, [[b for bs in per_client for b in bs]],
                                                            a.request_timeout))
            sequential = summarize(seq_records, seq_wall)
            log(f"{c} clients: {concurrent['tok_s']:.1f} tok/s; one at a time {sequential['tok_s']:.1f} tok/s; "
                f"failed {concurrent['failed'] + sequential['failed']}")
            result["scenarios"].append({"clients": c, "concurrent": concurrent, "sequential": sequential,
                                        "records": records, "sequential_records": seq_records})
        if time.monotonic() - t_start <= a.max_seconds:
            result["interleave"] = asyncio.run(interleave(server.url, a, vocab))
    finally:
        result["server_exit"] = server.stop()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = result["scenarios"]
    result["table"] = table(rows)
    base = next((r["concurrent"]["tok_s"] for r in rows if r["clients"] == 1), None)
    goal = next((r for r in rows if r["clients"] == GOAL_CLIENTS), None)
    failed = sum(r["concurrent"]["failed"] + r["sequential"]["failed"] for r in rows)
    if goal is not None and base:
        ratio = goal["concurrent"]["tok_s"] / base
        result["goal"] = {"ratio": ratio, "target": GOAL_RATIO, "failed": failed,
                          "status": "met" if ratio >= GOAL_RATIO and failed == 0 else "not met"}
    (a.out / "bench-serve.json").write_text(json.dumps(result, indent=1))
    report = [result["table"]]
    if "interleave" in result:
        it = result["interleave"]
        report.append(f"\ninterleave: a {it['long_prompt_tokens']}-token prompt admitted while one client decodes: "
                      f"its TTFT {fmt(it['long_ttft_s'], ' ms', 1e3)}; the decoding client's longest gap "
                      f"{fmt(it['runner_gap_max_during_admission_s'], ' ms', 1e3)} (median "
                      f"{fmt(it['runner_gap_median_s'], ' ms', 1e3)})")
    if "goal" in result:
        g = result["goal"]
        report.append(f"goal: {GOAL_CLIENTS} clients >= {GOAL_RATIO}x the 1-client tok/s, no failures: "
                      f"{g['ratio']:.2f}x, {g['failed']} failed: {g['status']}")
    text = "\n".join(report)
    (a.out / "bench-serve-table.txt").write_text(text + "\n")
    print(text)
    return 0 if result["server_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
