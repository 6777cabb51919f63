"""`mamba2-aot serve` for real: a uvicorn server in a subprocess on an ephemeral 127.0.0.1 port
(behind the import blocker: no exporter, flax, tensorflow or torch), the official `openai`
client, httpx for the error cases, many concurrent requests each equal to its solo runtime
result, disconnects that free their slot, metrics and log lines, and a SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

import runtime
from fixtures_artifacts import HEAVY, aot_cache_env, run_cli, subprocess_env  # noqa: F401
from fixtures_serve import (API_KEY, CHUNK, EOS, SLOTS, ServerProcess, chars, encode, metric,  # noqa: F401
                            serve_art)

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

NAME = "tiny"
BLOCK = 2
AUTH = {"Authorization": f"Bearer {API_KEY}"}
V = 96


def text_of(ids: list[int]) -> str:
    """What the character tokenizer decodes (eos is special: skipped)."""
    return "".join(chr(t + 31) for t in ids if t != EOS)


@pytest.fixture(scope="module")
def model(serve_art):
    """The reference: the same artifact and weights in this process, one request at a time."""
    return runtime.load(serve_art.path, serve_art.weights)


@pytest.fixture(scope="module")
def server(serve_art, chars):
    s = ServerProcess(serve_art.path, serve_art.weights, serve_art.cache_dir, "--tokenizer", chars,
                      "--slots", SLOTS, "--block", BLOCK, "--prefill-chunk", CHUNK, "--prefix-cache-mb", 4,
                      "--api-key", API_KEY, "--served-model-name", NAME, "--max-body-bytes", 65536)
    try:
        s.health = s.wait_ready()
        yield s
        assert psutil.Process(s.proc.pid).children(recursive=True) == []  # it starts no processes
        assert s.terminate() == 0, "\n".join(s.lines[-20:])
        assert s.leaked() == []  # neither exporter, flax, tensorflow nor torch was imported
    finally:
        s.kill()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def wait_until(check, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------ the OpenAI API


def test_health_is_503_while_loading_then_200(server):
    assert server.health[-1] == 200 and 503 in server.health[:-1]
    with client(server) as c:
        assert [m.id for m in c.models.list().data] == [NAME]


def test_completions_with_the_openai_client(server, model):
    with client(server) as c:
        r = c.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=12, temperature=0,
                                 extra_body={"return_token_ids": True, "ignore_eos": True})
        want = model.generate([[5, 6, 7]], 12, ignore_eos=True)[0]
        (ch,) = r.choices
        assert (ch.token_ids, ch.text, ch.finish_reason, ch.index) == (want, text_of(want), "length", 0)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 12, 15)
        assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")

        # A text prompt, n choices, a seed and vLLM's sampling extensions.
        r = c.completions.create(model=NAME, prompt="Mamba", max_tokens=10, temperature=0.9, seed=7, n=2,
                                 extra_body={"top_k": 20, "min_p": 0.05, "return_token_ids": True})
        want = model.complete([encode("Mamba")] * 2, 10, temperature=0.9, top_k=20, min_p=0.05, seed=7)
        assert [(ch.token_ids, ch.finish_reason) for ch in r.choices] == [(w.tokens, w.finish_reason) for w in want]
        assert r.choices[0].prompt_token_ids == encode("Mamba")

        # A batch of token-id prompts: choice p * n + j is choice j of prompt p alone.
        prompts = [[1, 2], [3, 4, 5]]
        r = c.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0.5, seed=3, n=2,
                                 top_p=0.9, extra_body={"return_token_ids": True})
        got = {ch.index: ch.token_ids for ch in r.choices}
        for p, prompt in enumerate(prompts):
            for j, w in enumerate(model.generate([prompt] * 2, 6, temperature=0.5, seed=3, top_p=0.9)):
                assert got[p * 2 + j] == w


def test_stop_token_ids_and_stop_strings(server, model):
    free = model.generate([[9, 9]], 24, ignore_eos=True)[0]
    with client(server) as c:
        stop_id = free[5]
        r = c.completions.create(model=NAME, prompt=[9, 9], max_tokens=24, temperature=0,
                                 extra_body={"stop_token_ids": [stop_id], "ignore_eos": True, "return_token_ids": True})
        assert r.choices[0].token_ids == free[:free.index(stop_id) + 1] and r.choices[0].finish_reason == "stop"
        text = text_of(free)
        stop = text[8:10]
        r = c.completions.create(model=NAME, prompt=[9, 9], max_tokens=24, temperature=0, stop=[stop, "\x7f\x7f"],
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 24


def test_streaming_one_chunk_per_decode_block(server, model):
    want = model.generate([[5, 6, 7]], 25, temperature=0.8, seed=5, ignore_eos=True)[0]
    with client(server) as c:
        chunks = list(c.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=25, temperature=0.8, seed=5,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"return_token_ids": True, "ignore_eos": True}))
    parts = [ch.choices[0] for ch in chunks if ch.choices]
    assert sum((p.token_ids for p in parts), []) == want
    # the first token alone, right after the prefill; then one chunk per block
    assert len(parts[0].token_ids) == 1 and len(parts) == 1 + math.ceil(24 / BLOCK)
    assert all(0 < len(p.token_ids) <= BLOCK for p in parts)
    assert "".join(p.text for p in parts) == text_of(want)
    assert [p.finish_reason for p in parts][-2:] == [None, "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 25
    assert len({ch.id for ch in chunks}) == 1


def test_chat_completions_and_streaming(server, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = encode("<system>Be brief.|<user>Hi|<assistant>")
    want = model.complete([prompt], 8, temperature=0.7, seed=9)[0]
    with client(server) as c:
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0.7, seed=9)
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text_of(want.tokens)
        assert r.choices[0].finish_reason == want.finish_reason and r.usage.prompt_tokens == len(prompt)
        chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0.7, seed=9,
                                                stream=True))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text_of(want.tokens)
        assert chunks[-1].choices[0].finish_reason == want.finish_reason
        with pytest.raises(openai.BadRequestError) as e:  # the template refuses the role
            c.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x"}], max_tokens=2)
        assert "unknown role tool" in str(e.value)


# ------------------------------------------------------------------ errors over httpx


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert code is None or err["code"] == code
    assert param is None or err["param"] == param
    return err


def test_error_cases(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        post = lambda body, **kw: c.post("/v1/completions", json=body, headers=kw.pop("headers", AUTH), **kw)  # noqa: E731
        _error(post({"prompt": [1], "max_tokens": 0}), 400, param="max_tokens")
        _error(post({"prompt": [1], "temperature": -1}), 400, param="temperature")
        _error(post({"prompt": [1] * 300}), 400, param="prompt")  # over the artifact's 256
        _error(post({"prompt": [1, 96]}), 400, param="prompt")  # outside the vocabulary
        _error(post({"prompt": [1], "logprobs": 3}), 400, param="logprobs")
        _error(c.post("/v1/completions", content=b"{not json", headers=AUTH), 400, "invalid_json")
        _error(c.post("/v1/completions", json=[1, 2], headers=AUTH), 400, "invalid_json")
        err = _error(post({"prompt": [1]}, headers={}), 401, "invalid_api_key")
        assert "Authorization" in err["message"]
        _error(post({"prompt": [1]}, headers={"Authorization": "Bearer wrong"}), 401)
        _error(c.get("/v1/models"), 401)
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200  # open
        _error(post({"prompt": [1], "model": "gpt-4"}), 404, "model_not_found", "model")
        _error(c.get("/v1/nothing", headers=AUTH), 404, "not_found")
        _error(c.delete("/v1/completions", headers=AUTH), 405)
        _error(post({"prompt": [1] * 50000}), 413, "request_too_large")  # > --max-body-bytes 65536
        _error(c.post("/v1/chat/completions", json={"messages": "hi"}, headers=AUTH), 400, param="messages")


def test_a_client_error_is_never_a_500(server):
    """Every field set to values of every JSON type (and non-finite numbers): 200 or 4xx."""
    values = [None, True, -1, 0, 3, 2.5, "x", "", [], [1], [[]], {}, {"a": 1}, 2**70]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stream",
              "stream_options", "stop_token_ids", "ignore_eos", "return_token_ids", "user", "model", "best_of",
              "echo", "logit_bias"]
    statuses = set()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for field in fields:
            for v in values:
                body = {"prompt": [1, 2], "max_tokens": 2, field: v}
                r = c.post("/v1/completions", json=body, headers=AUTH)
                assert r.status_code == 200 or 400 <= r.status_code < 500, (field, v, r.text)
                statuses.add(r.status_code)
        for raw in (b'{"prompt": [1], "temperature": NaN}', b'{"prompt": [1], "top_p": Infinity}',
                    b'{"prompt": [1], "max_tokens": 1e400}', b"[" * 30000 + b"]" * 30000,
                    b'{"prompt": "\xff\xfe"}'):
            r = c.post("/v1/completions", content=raw, headers=AUTH)
            assert r.status_code == 400, r.text
        for messages in (None, [None], [{"role": "user"}], [{"role": "user", "content": {"x": 1}}]):
            r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, headers=AUTH)
            assert r.status_code == 400, r.text
    assert {200, 400} <= statuses


# ------------------------------------------------------------------ continuous batching


def _requests() -> list[dict]:
    """18 requests: prompts across chunks and segments, every sampler, seeds, n, stops, streaming."""
    rng = np.random.default_rng(7)
    samplers = [dict(temperature=0.0), dict(temperature=0.8, seed=1), dict(temperature=1.0, top_k=5, seed=2),
                dict(temperature=0.7, top_p=0.8, seed=3), dict(temperature=1.1, min_p=0.1, seed=4),
                dict(temperature=0.9, seed=2**40 + 1)]
    out = []
    for i in range(18):
        prompt = rng.integers(1, V, int(rng.choice([1, 3, 8, 17, 31, 40, 70, 120]))).tolist()
        out.append(dict(prompt=prompt, n=int(rng.choice([1, 1, 2])), max_tokens=int(rng.integers(1, 30)),
                        stream=bool(i % 2), ignore_eos=bool(i % 3 == 0),
                        stop=[int(rng.integers(1, V))] if i % 4 == 1 else [], **samplers[i % len(samplers)]))
    return out


async def _ask(c, spec: dict) -> list[tuple[list[int], str]]:
    """One request through the openai client: (token ids, finish reason) per choice."""
    kw = {k: spec[k] for k in ("temperature", "top_p", "seed") if k in spec}
    extra = {"return_token_ids": True, "ignore_eos": spec["ignore_eos"], "stop_token_ids": spec["stop"],
             **{k: spec[k] for k in ("top_k", "min_p") if k in spec}}
    r = await c.completions.create(model=NAME, prompt=spec["prompt"], max_tokens=spec["max_tokens"], n=spec["n"],
                                   stream=spec["stream"], extra_body=extra, **kw)
    if not spec["stream"]:
        return [(ch.token_ids, ch.finish_reason) for ch in sorted(r.choices, key=lambda ch: ch.index)]
    got = [([], None) for _ in range(spec["n"])]
    async for chunk in r:
        for ch in chunk.choices:
            got[ch.index][0].extend(ch.token_ids)
            got[ch.index] = (got[ch.index][0], ch.finish_reason or got[ch.index][1])
    return got


def test_concurrent_requests_each_equal_their_solo_run(server, model):
    specs = _requests()

    async def go():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[_ask(c, s) for s in specs])

    results = asyncio.run(go())
    for spec, got in zip(specs, results):
        kw = {k: spec[k] for k in ("temperature", "top_p", "seed", "top_k", "min_p") if k in spec}
        want = model.complete([spec["prompt"]] * spec["n"], spec["max_tokens"], stop=spec["stop"],
                              ignore_eos=spec["ignore_eos"], **kw)
        assert got == [(w.tokens, w.finish_reason) for w in want], spec
    assert metric(metrics(server), "mamba2_aot_slots_busy") == 0


def test_a_disconnect_cancels_the_request_and_frees_its_slot(server):
    gone = lambda: metric(metrics(server), "mamba2_aot_requests_total", '{status="499"}') or 0  # noqa: E731
    before = gone()
    long = {"prompt": [1, 2], "max_tokens": 60000, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}, headers=AUTH) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
        # closed after the first chunk: cancelled within a block, not after 60000 tokens
        wait_until(lambda: gone() == before + 1 and metric(metrics(server), "mamba2_aot_slots_busy") == 0)
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            c.post("/v1/completions", json=long, headers=AUTH, timeout=1.0)
        wait_until(lambda: gone() == before + 2 and metric(metrics(server), "mamba2_aot_slots_busy") == 0)
        r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 3}, headers=AUTH)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert len(server.log_lines(r"status=499")) >= 2


def test_multi_turn_hits_the_prefix_cache(server, model):
    stats = lambda: {k: metric(metrics(server), f"mamba2_aot_prefix_cache_{k}_total") for k in ("hits", "tokens_skipped")}  # noqa: E731,E501
    before = stats()
    prompt = np.random.default_rng(3).integers(1, V, 45).tolist()
    with client(server) as c:
        first = c.completions.create(model=NAME, prompt=prompt, max_tokens=7, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].token_ids
        follow = prompt + first + [3, 4]
        second = c.completions.create(model=NAME, prompt=follow, max_tokens=7, temperature=0.8, seed=4,
                                      extra_body={"return_token_ids": True}).choices[0].token_ids
    assert first == model.generate([prompt], 7, ignore_eos=True)[0]
    assert second == model.generate([follow], 7, temperature=0.8, seed=4)[0]
    after = stats()
    assert after["hits"] == before["hits"] + 1 and after["tokens_skipped"] == before["tokens_skipped"] + 52


def test_metrics_and_one_log_line_per_request(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 5, "ignore_eos": True}, headers=AUTH)
        rid = r.json()["id"]
        text = c.get("/metrics").text
    for name in ("mamba2_aot_prompt_tokens_total", "mamba2_aot_generation_tokens_total",
                 "mamba2_aot_time_to_first_token_seconds_count", "mamba2_aot_time_per_output_token_seconds_count",
                 "mamba2_aot_request_duration_seconds_count"):
        assert metric(text, name) > 0, name
    assert metric(text, "mamba2_aot_requests_total", '{status="200"}') > 0
    assert metric(text, "mamba2_aot_requests_total", '{status="400"}') > 0
    assert metric(text, "mamba2_aot_queue_depth") == 0 and metric(text, "mamba2_aot_slots") == SLOTS
    assert metric(text, "mamba2_aot_prefix_cache_lookups_total") > 0
    wait_until(lambda: server.log_lines(rid))
    (line,) = server.log_lines(rid)
    assert "status=200 prompt_tokens=3 completion_tokens=5 ttft=" in line and " total=" in line


# ------------------------------------------------------------------ stopping


def _stream_lines(url: str, body: dict, out: list, first: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    out.append(line)
                    first.set()


def test_sigterm_drains_then_exits_0(serve_art):
    s = ServerProcess(serve_art.path, serve_art.weights, serve_art.cache_dir, "--slots", 2, "--block", 1,
                      "--drain-timeout", 8)
    try:
        s.wait_ready()
        runs = {}
        for name, n in (("short", 1500), ("long", 60000)):  # short finishes in the drain, long cannot
            lines, first = [], threading.Event()
            body = {"prompt": [1, 2], "max_tokens": n, "ignore_eos": True, "return_token_ids": True}
            t = threading.Thread(target=_stream_lines, args=(s.url, body, lines, first))
            t.start()
            runs[name] = (lines, first, t)
        for lines, first, _ in runs.values():
            assert first.wait(30)
        t0 = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        wait_until(lambda: s.log_lines("draining"))
        assert "2 in flight" in s.log_lines("draining")[0]
        with httpx.Client(base_url=s.url, timeout=10) as c:
            _error(c.get("/health"), 503, "draining")
            _error(c.post("/v1/completions", json={"prompt": [1]}), 503, "draining")
        assert s.proc.wait(40) == 0, "\n".join(s.lines[-20:])
        assert time.monotonic() - t0 < 8 + 10
        for _, _, t in runs.values():
            t.join(10)
        short, long = runs["short"][0], runs["long"][0]
        assert sum(len(json.loads(ln[6:])["choices"][0]["token_ids"]) for ln in short[:-1]) == 1500
        assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert long[-1] == "data: [DONE]" and json.loads(long[-2][6:])["error"]["code"] == "shutting_down"
        s.kill()
        assert s.leaked() == [] and not psutil.pid_exists(s.proc.pid)
    finally:
        s.kill()


# ------------------------------------------------------------------ the command line


def test_command_line_errors_are_one_line(serve_art, tmp_path):
    env = subprocess_env(serve_art.cache_dir)
    r = run_cli("--help", env=env, blocked=HEAVY)
    assert r.returncode == 0 and "  serve " in r.stdout
    cases = [(("serve", tmp_path / "missing"), "missing"),
             (("serve", serve_art.path, "--slots", "3"), "batch buckets (1, 2, 4, 8)"),
             (("serve", serve_art.path, "--block", "17"), "[1, 16]"),
             (("serve", serve_art.path, "--tokenizer", tmp_path), "no tokenizer.json")]
    cases = [((*args, "--weights", "random"), words) for args, words in cases]
    # a load that fails after the port is taken: the server stops and says why
    cases.append((("serve", serve_art.path, "--port", "0", "--weights", tmp_path / "nope.safetensors"), "nope"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cases.append((("serve", serve_art.path, "--weights", "random", "--port", str(taken.getsockname()[1])),
                      "cannot listen"))
        for args, words in cases:
            r = run_cli(*args, env=env, blocked=HEAVY)
            lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("LEAKED=")]
            assert r.returncode == 2 and lines[-1].startswith("error: ") and words in lines[-1], r.stderr
            assert not any("Traceback" in ln for ln in lines)
    r = run_cli("serve", serve_art.path, "--weights", "random", env=env, blocked=HEAVY + ("fastapi",))
    assert r.returncode == 2 and "pip install 'mamba2-aot[serve]'" in r.stderr
    r = run_cli("serve", serve_art.path, env=env)
    assert r.returncode == 2 and "Missing option '--weights'" in r.stderr
