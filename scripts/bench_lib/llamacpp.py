"""llama.cpp for the CPU comparison: fetched, built, converted and run at benchmark time.

Nothing of llama.cpp is in this repository. The pinned llama-cpp-python sdist on PyPI vendors
llama.cpp (with Mamba-2 support), its `convert_hf_to_gguf.py`, `llama-bench`,
`llama-batched-bench` and `llama-quantize`; it is downloaded with pip, unpacked and built with
cmake (CPU only, native, shared libraries) into a cache directory outside the repository,
keyed by this machine's CPU flags and compiler, so a later run reuses it. A small greedy
program of ours (llama_greedy.cpp, ids in, ids out) is compiled against the built library.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench_lib.common import log

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
GREEDY_SRC = Path(__file__).resolve().parent / "llama_greedy.cpp"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF", "-DGGML_BLAS=OFF",
)


class SetupError(Exception):
    """A missing tool or a failed fetch/build/convert step: reported as one `error:` line."""


def default_cache_dir() -> Path:
    env = os.environ.get("MAMBA2_LLAMACPP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mamba2-aot" / "llama.cpp"


def _tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-n:]


def _run_logged(cmd: list[str], logfile: Path, what: str, cwd: Path | None = None,
                env: dict | None = None) -> None:
    """Run `cmd` with its output appended to `logfile`; SetupError naming the log if it fails."""
    with open(logfile, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}).returncode
        except OSError as e:
            raise SetupError(f"{what}: cannot run {cmd[0]} ({e})") from None
    if rc:
        raise SetupError(f"{what} failed (exit {rc}): {_tail(logfile)} (full log: {logfile})")


# ---------------------------------------------------------------------------------------------
# Toolchain


def _which_env(var: str, *names: str) -> str | None:
    if os.environ.get(var):
        return shutil.which(os.environ[var].split()[0])
    return next((p for p in map(shutil.which, names) if p), None)


def toolchain() -> dict:
    """cmake, a C and a C++ compiler (CC/CXX respected), ninja if present; SetupError if missing."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SetupError("cmake not found on PATH: install cmake >= 3.14 (e.g. `apt-get install cmake` "
                         "or `pip install cmake`) to build llama.cpp")
    cc = _which_env("CC", "cc", "gcc", "clang")
    cxx = _which_env("CXX", "c++", "g++", "clang++")
    if cc is None or cxx is None:
        missing = " and no ".join(n for n, p in (("C compiler", cc), ("C++ compiler", cxx)) if p is None)
        raise SetupError(f"no {missing} found (looked at $CC/$CXX, cc/gcc/clang, c++/g++/clang++): "
                         "install one, e.g. `apt-get install build-essential`")
    out = {"cmake": cmake, "cc": cc, "cxx": cxx, "ninja": shutil.which("ninja")}
    for key, exe, flag in (("cmake_version", cmake, "--version"), ("cxx_version", cxx, "--version")):
        try:
            out[key] = subprocess.run([exe, flag], capture_output=True, text=True,
                                      timeout=30).stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            out[key] = None
    return out


def _cpu_flags() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith(("flags", "Features")):
                return " ".join(sorted(ln.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Source and build


def fetch_source(cache: Path) -> Path:
    """The vendored llama.cpp tree of the pinned sdist (downloaded with pip and unpacked once)."""
    src_root = cache / f"src-{SDIST_VERSION}"
    tree = src_root / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file() and (src_root / ".complete").is_file():
        return tree
    dl = cache / "download"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.is_file():
        log(f"downloading {SDIST}=={SDIST_VERSION} (sdist) from PyPI with pip", "llama.cpp")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"{SDIST}=={SDIST_VERSION}", "-d", str(dl)], capture_output=True, text=True)
        if proc.returncode or not sdist.is_file():
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise SetupError(f"cannot download {SDIST}=={SDIST_VERSION} from PyPI with pip "
                             f"(exit {proc.returncode}: {last[0][:300]}); check network access to "
                             f"pypi.org or put the sdist at {sdist}")
    log(f"unpacking {sdist.name}", "llama.cpp")
    tmp = cache / f".src-{SDIST_VERSION}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SetupError(f"cannot unpack {sdist} ({e}): delete it and run again") from None
    (tmp / ".complete").write_text(SDIST_VERSION + "\n")
    shutil.rmtree(src_root, ignore_errors=True)
    tmp.rename(src_root)
    if not (tree / "CMakeLists.txt").is_file():
        raise SetupError(f"{sdist.name} has no vendor/llama.cpp: is {SDIST_VERSION} the right version?")
    return tree


def build(cache: Path, jobs: int) -> dict:
    """Configure and build the needed targets (reused when this machine's build exists).
    Returns {"bin": {name: path}, "src": tree, "build_dir": ..., ...}."""
    tools = toolchain()
    tree = fetch_source(cache)
    key_text = "\n".join([SDIST_VERSION, _cpu_flags(), tools["cxx_version"] or tools["cxx"],
                          tools["cmake_version"] or "", *CMAKE_OPTIONS])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    bdir = cache / f"build-{SDIST_VERSION}-{key}"
    stamp = bdir / "bench-build.json"
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if all(Path(p).is_file() for p in info["bin"].values()):
            log(f"reusing the build in {bdir}", "llama.cpp")
            return info
    bdir.mkdir(parents=True, exist_ok=True)
    logfile = bdir / "build.log"
    logfile.write_text(f"build of llama.cpp from {SDIST}=={SDIST_VERSION}\n")
    gen = ["-G", "Ninja"] if tools["ninja"] else []
    t0 = time.perf_counter()
    log(f"configuring llama.cpp (CPU only, native) in {bdir}", "llama.cpp")
    _run_logged([tools["cmake"], "-S", str(tree), "-B", str(bdir / "cmake"), *gen, *CMAKE_OPTIONS,
                 f"-DCMAKE_C_COMPILER={tools['cc']}", f"-DCMAKE_CXX_COMPILER={tools['cxx']}"],
                logfile, "cmake configure")
    log(f"building {', '.join(TARGETS)} with {jobs} jobs (several minutes; log: {logfile})", "llama.cpp")
    _run_logged([tools["cmake"], "--build", str(bdir / "cmake"), "--config", "Release", "-j", str(jobs),
                 "--target", *TARGETS, "llama"], logfile, "cmake build")
    bindir = bdir / "cmake" / "bin"
    bins = {t: bindir / t for t in TARGETS}
    missing = [t for t, p in bins.items() if not p.is_file()]
    if missing:
        raise SetupError(f"the build produced no {', '.join(missing)} in {bindir} (log: {logfile})")
    bins["llama-greedy"] = _build_greedy(tree, bdir, tools, logfile)
    info = {"sdist": f"{SDIST}=={SDIST_VERSION}", "src": str(tree), "build_dir": str(bdir),
            "bin": {k: str(v) for k, v in bins.items()}, "cmake_options": list(CMAKE_OPTIONS),
            "toolchain": tools, "build_s": round(time.perf_counter() - t0, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    log(f"built in {info['build_s']:.0f}s", "llama.cpp")
    return info


def _build_greedy(tree: Path, bdir: Path, tools: dict, logfile: Path) -> Path:
    """Our ids-in, ids-out greedy program, linked against the built shared libraries."""
    libdirs = sorted({str(p.parent) for p in (bdir / "cmake").rglob("libllama.so*")}
                     | {str(p.parent) for p in (bdir / "cmake").rglob("libggml*.so*")})
    if not libdirs:
        raise SetupError(f"the build produced no libllama.so under {bdir / 'cmake'} (log: {logfile})")
    out = bdir / "llama-greedy"
    cmd = [tools["cxx"], "-O2", "-std=c++17", f"-I{tree / 'include'}", f"-I{tree / 'ggml' / 'include'}",
           str(GREEDY_SRC), "-o", str(out)]
    for d in libdirs:
        cmd += [f"-L{d}", f"-Wl,-rpath,{d}"]
    cmd += ["-lllama", "-lggml", "-lggml-base"]
    _run_logged(cmd, logfile, "compiling llama_greedy.cpp")
    return out


# ---------------------------------------------------------------------------------------------
# Conversion


def convert(tree: Path, bins: dict, ckpt: Path, outdir: Path, quants: list[str], log_dir: Path) -> dict:
    """GGUF files of the HF checkpoint: f32/f16 by llama.cpp's converter (run by this Python,
    which must import torch, transformers, numpy, pyyaml, tqdm, requests; it uses its own
    vendored gguf-py, and without tokenizer files the GPT-NeoX vocabulary it bundles), the others
    quantized from f32 with llama-quantize."""
    outdir.mkdir(parents=True, exist_ok=True)
    logfile = log_dir / "convert.log"
    files = {}
    for q in ["f32"] + [q for q in quants if q != "f32"]:
        path = outdir / f"model-{q}.gguf"
        if not path.is_file():
            t0 = time.perf_counter()
            if q in ("f32", "f16"):
                _run_logged([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", q,
                             "--outfile", str(path)], logfile, f"convert_hf_to_gguf.py --outtype {q}")
            else:
                _run_logged([bins["llama-quantize"], str(outdir / "model-f32.gguf"), str(path), q],
                            logfile, f"llama-quantize {q}")
            log(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f}s", "gguf")
        files[q] = path
    return {q: files[q] for q in quants}


def check_converter_imports() -> None:
    """The converter's imports, checked up front so a missing package is one clear line."""
    import importlib.util

    need = {"torch": "torch", "transformers": "transformers", "numpy": "numpy", "yaml": "pyyaml",
            "tqdm": "tqdm", "safetensors": "safetensors", "requests": "requests"}
    missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SetupError(f"llama.cpp's converter needs {', '.join(missing)} in this Python "
                         f"({sys.executable}): pip install -e '.[bench]' (or pip install {' '.join(missing)})")


# ---------------------------------------------------------------------------------------------
# Running llama.cpp's tools: one process per sample, peak RSS from wait4


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a process to completion; its stdout, stderr tail, wall seconds and peak RSS (MiB)."""
    import tempfile

    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    return {"rc": proc.returncode, "stdout": out, "stderr_tail": err.strip()[-1500:], "wall_s": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024}


def _fail(r: dict, what: str) -> dict:
    lines = [ln for ln in r["stderr_tail"].splitlines() if ln.strip()]
    return {"error": f"{what}: exit {r['rc']}: {(lines[-1] if lines else '')[:300]}",
            "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]}


def _llama_bench(bins: dict, gguf: Path, threads: int, prompt: int, gen: int, raw_keys: tuple[str, ...]) -> dict:
    """One llama-bench test (pp `prompt` or tg `gen`, the other 0), its own warm-up first."""
    r = run_measured([bins["llama-bench"], "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                      "-r", "1", "-o", "json"])
    if r["rc"]:
        return _fail(r, "llama-bench")
    rows = json.loads(r["stdout"])
    row = next(x for x in rows if x.get("n_gen") == gen and x.get("n_prompt") == prompt)
    return {"tok_s": float(row["avg_ts"]), "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
            "raw": {k: row.get(k) for k in raw_keys}}


def bench_decode_b1(bins: dict, gguf: Path, n: int, threads: int) -> dict:
    """llama-bench tg: n tokens one at a time (random ids, no sampling)."""
    return _llama_bench(bins, gguf, threads, 0, n, ("avg_ts", "samples_ts", "n_threads", "n_batch", "n_ubatch",
                                                    "type_k", "model_type", "cpu_info", "build_commit"))


def bench_prefill(bins: dict, gguf: Path, T: int, threads: int) -> dict:
    """llama-bench pp: one T-token prompt (default batch/ubatch sizes)."""
    return _llama_bench(bins, gguf, threads, T, 0, ("avg_ts", "samples_ts", "n_threads", "n_batch", "n_ubatch"))


def bench_decode_batched(bins: dict, gguf: Path, B: int, prompt: int, n: int, threads: int) -> dict:
    """llama-batched-bench: B sequences of a `prompt`-token prompt each, then n tokens per
    sequence, all B in one batch per step; S_TG = B * n / decode time."""
    ctx = B * (prompt + n) + 16
    r = run_measured([bins["llama-batched-bench"], "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                      "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(n),
                      "-npl", str(B), "--output-format", "jsonl"])
    if r["rc"]:
        return _fail(r, "llama-batched-bench")
    rows = [json.loads(ln) for ln in (r["stdout"] + "\n" + r["stderr_tail"]).splitlines()
            if ln.startswith("{") and '"speed_tg"' in ln]
    row = next((x for x in rows if x.get("pl") == B and x.get("tg") == n), None)
    if row is None:
        return {"error": "llama-batched-bench printed no result row (context too small?)",
                "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]}
    return {"tok_s": float(row["speed_tg"]), "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
            "raw": row}


def greedy(bins: dict, gguf: Path, prompt: list[int], n: int, threads: int) -> dict:
    """Our greedy program: ids in, ids out; the process's peak RSS is a load-and-generate RSS."""
    r = run_measured([bins["llama-greedy"], str(gguf), str(n), str(threads), ",".join(map(str, prompt))])
    line = next((ln for ln in r["stdout"].splitlines() if ln.startswith("{")), None)
    if r["rc"] or line is None:
        return _fail(r, "llama-greedy")
    return {**json.loads(line), "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]}
