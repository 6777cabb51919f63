"""mamba2-aot's side of the llama.cpp comparison: one task per process, public API only.

Each task is a fresh interpreter (scripts/bench_llamacpp.py --worker ours) that imports
`runtime`, loads the artifact and the HF checkpoint with `runtime.load`, and generates with
`LoadedModel.stream` / `generate`, stop=[] and ignore_eos=True (no stop token: every row runs its
full length).

  tokens   greedy tokens of one prompt (the agreement check against llama.cpp f32)
  decode   B rows of a P-token prompt; stream(max_new_tokens=block + n, block=block): the first
           block carries prefill, compilation and first execution; the clock runs from the
           first block's arrival to the last one's, over exactly n new tokens per row
  prefill  one T-token prompt: a warm-up generate (compile / cache load), then
           stream(max_new_tokens=2, block=1): prefill = time to the first token minus the time of
           the second (a one-token decode call), i.e. the prompt's pass plus its host work
  rss      load + generate(P-token prompt, n new tokens): the process's peak RSS is measured
           by the parent (wait4); VmHWM/VmRSS at each stage are recorded here
"""

from __future__ import annotations

import time

from bench_lib.common import prompt_tokens

NO_STOP = {"stop": [], "ignore_eos": True}


def _vm() -> dict:
    """VmHWM and VmRSS of this process, MiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(("VmHWM:", "VmRSS:")):
                    k, v = ln.split(":", 1)
                    out[k] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def run(spec: dict) -> dict:
    stages = {"start": _vm()}
    t0 = time.perf_counter()
    import runtime  # light: jax is imported by load()
    task, V, seed, P = spec["task"], spec["vocab"], spec["seed"], spec["prompt_len"]
    B = spec.get("batch", 1)
    T = spec.get("prompt_tokens", P)
    model = runtime.load(spec["artifact_dir"], weights=spec["weights_dir"], prepare=[(B, T)])
    res: dict = {"task": task, "load_s": time.perf_counter() - t0}  # jax import included
    stages["load"] = _vm()

    if task == "tokens":
        prompt = [spec["prompt"]]
        res["tokens"] = model.generate(prompt, spec["n"], **NO_STOP)[0]
    elif task == "rss":
        prompt = prompt_tokens(V, 1, P, seed).tolist()
        out = model.generate(prompt, spec["n"], **NO_STOP)
        res["generated"] = len(out[0])
    elif task == "decode":
        n = spec["n"]
        block = n
        cap = model.limits.get("decode_block")  # an artifact whose decode call is narrower
        if cap:
            block = min(block, int(cap))
        prompts = prompt_tokens(V, B, P, seed).tolist()
        arrivals, counts = [], []
        t_call = time.perf_counter()
        for gen in model.stream(prompts, max_new_tokens=block + n, block=block, **NO_STOP):
            arrivals.append(time.perf_counter())
            counts.append(sum(len(t) for t in gen.tokens))
        timed = sum(counts[1:])
        if timed != B * n:
            raise RuntimeError(f"decode made {timed} timed tokens, expected {B * n} (blocks {counts})")
        res.update(decode_s=arrivals[-1] - arrivals[0], tok_s=timed / (arrivals[-1] - arrivals[0]),
                   first_block_s=arrivals[0] - t_call, block=block, blocks=counts)
    elif task == "prefill":
        prompt = prompt_tokens(V, 1, T, seed).tolist()
        t1 = time.perf_counter()
        model.generate(prompt, 1, **NO_STOP)  # warm-up: compile or cache load, first execution
        res["warmup_s"] = time.perf_counter() - t1
        t_call = time.perf_counter()
        it = model.stream(prompt, max_new_tokens=2, block=1, **NO_STOP)
        next(it)
        t_first = time.perf_counter()
        next(it)
        t_second = time.perf_counter()
        first, step = t_first - t_call, t_second - t_first
        res.update(first_token_s=first, one_token_call_s=step, prefill_s=first - step,
                   tok_s=T / (first - step))
    else:
        raise ValueError(f"unknown task {task!r}")
    stages["end"] = _vm()
    res["stages_mib"] = stages
    return res
