"""This machine's roofline, measured in the same run: read bandwidth and fp32 GEMM peak.

Bandwidth: sum over a large float32 array (larger than any cache), best of several passes,
with numpy on one thread, numpy on every core (threads over slices; numpy releases the GIL in
reductions), an XLA-jitted sum and an XLA-jitted matrix-vector product (a decode step's pattern). The decode floor uses the best of them.
GEMM: XLA-jitted float32 matmuls, 2048x2048x2048 and the model's own prefill shapes
(in_proj and out_proj at T tokens), best of several; the prefill ceiling uses the best.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from bench_lib.common import log


def _best(fn, passes: int) -> tuple[float, list[float]]:
    fn()  # warm: page faults, compilation
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def bandwidth(nbytes: int, passes: int = 5) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = nbytes // 4
    a = np.ones(n, np.float32)
    a[::4096] = 2.0  # touch and vary
    out = {"array_bytes": a.nbytes, "passes": passes}

    best, times = _best(lambda: a.sum(), passes)
    out["numpy_1thread_gb_s"] = a.nbytes / best / 1e9
    out["numpy_1thread_times_s"] = times

    cores = os.cpu_count() or 1
    parts = np.array_split(a, cores)
    with ThreadPoolExecutor(cores) as ex:
        best, times = _best(lambda: list(ex.map(np.sum, parts)), passes)
    out["numpy_threads"] = cores
    out["numpy_threads_gb_s"] = a.nbytes / best / 1e9
    out["numpy_threads_times_s"] = times

    x = jax.device_put(a)
    del a, parts
    f = jax.jit(jnp.sum)
    best, times = _best(lambda: f(x).block_until_ready(), passes)
    out["xla_sum_gb_s"] = x.nbytes / best / 1e9
    out["xla_sum_times_s"] = times
    # The decode step's own access pattern: a matrix-vector product streaming the matrix once.
    k = 2048
    w = x[: (n // k) * k].reshape(-1, k)
    del x
    v = jnp.ones((k,), jnp.float32)
    mv = jax.jit(lambda w, v: jnp.einsum("nk,k->n", w, v))
    best, times = _best(lambda: mv(w, v).block_until_ready(), passes)
    out["xla_matvec_gb_s"] = w.nbytes / best / 1e9
    out["xla_matvec_times_s"] = times
    del w
    keys = ("numpy_1thread_gb_s", "numpy_threads_gb_s", "xla_sum_gb_s", "xla_matvec_gb_s")
    out["best_method"] = max(keys, key=lambda k: out[k])
    out["gb_s"] = out[out["best_method"]]
    return out


def gemm(shapes: dict[str, tuple[int, int, int]], passes: int = 5) -> dict:
    """shapes: name -> (m, k, n); each timed as jit(x[m,k] @ w[n,k].T), the model's layout."""
    import jax
    import jax.numpy as jnp

    out = {"passes": passes, "shapes": {}}
    f = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w))
    for name, (m, k, n) in shapes.items():
        kx, kw = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (m, k), jnp.float32)
        w = jax.random.normal(kw, (n, k), jnp.float32)
        best, times = _best(lambda: f(x, w).block_until_ready(), passes)
        out["shapes"][name] = {"m": m, "k": k, "n": n, "gflop_s": 2 * m * k * n / best / 1e9, "times_s": times}
    out["best_shape"] = max(out["shapes"], key=lambda s: out["shapes"][s]["gflop_s"])
    out["gflop_s"] = out["shapes"][out["best_shape"]]["gflop_s"]
    return out


def measure(spec: dict) -> dict:
    import jax

    cfg = spec["cfg"]
    d, inter = cfg["hidden_size"], cfg["expand"] * cfg["hidden_size"]
    in_proj = inter + inter + 2 * cfg["n_groups"] * cfg["state_size"] + cfg["num_heads"]
    T = spec["gemm_tokens"]
    res = {"jax_devices": [str(dv) for dv in jax.devices()]}
    log(f"read bandwidth over {spec['bandwidth_bytes'] / 2**30:.2f} GiB ...", "roofline")
    res["bandwidth"] = bandwidth(spec["bandwidth_bytes"], spec["roofline_passes"])
    b = res["bandwidth"]
    log(f"bandwidth: numpy 1 thread {b['numpy_1thread_gb_s']:.1f} GB/s, numpy {b['numpy_threads']} threads "
        f"{b['numpy_threads_gb_s']:.1f} GB/s, XLA sum {b['xla_sum_gb_s']:.1f} GB/s, XLA matvec "
        f"{b['xla_matvec_gb_s']:.1f} GB/s", "roofline")
    res["gemm"] = gemm({"square_2048": (2048, 2048, 2048),
                        f"in_proj_T{T}": (T, d, in_proj),
                        f"out_proj_T{T}": (T, inter, d)}, spec["roofline_passes"])
    log("GEMM: " + ", ".join(f"{k} {v['gflop_s']:.1f} GFLOP/s" for k, v in res["gemm"]["shapes"].items()),
        "roofline")
    return res
