"""The server's request handling without a socket: OpenAI bodies checked field by field,
text (incremental detokenization, stop strings, chat templates), and the app in-process
(httpx over ASGI) where a test must hold the model: 429 with Retry-After, 500 for one request
only, 503 while loading."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

import runtime
from fixtures_artifacts import aot_cache_env  # noqa: F401
from fixtures_serve import API_KEY, CHUNK, SLOTS, Proxy, char_tokenizer, chars, encode, serve_art  # noqa: F401
from runtime.serve.app import create_app
from runtime.serve.config import ServeConfig
from runtime.serve.errors import ApiError
from runtime.serve.schemas import Limits, parse
from runtime.serve.service import Service
from runtime.serve.text import Detokenizer, TextModel, TextStream

LIMITS = Limits(vocab_size=96, max_new_tokens=100, max_prompt_tokens=256, max_batch=8, max_stop_tokens=4,
                max_sequences=12, has_tokenizer=True)


def refused(body: dict, kind: str = "completion", lim: Limits = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, kind, "m", lim)
    return e.value


# ------------------------------------------------------------------ request bodies


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, 2, 200]}, "prompt"),
    ({"prompt": ["a", 3]}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 101}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "min_p": 1.0}, "min_p"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 9}, "n"),
    ({"prompt": ["a", "b", "c", "d"], "n": 4}, "n"),  # 16 sequences > 12 the server holds
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "a", "stop_token_ids": [1, 96]}, "stop_token_ids"),
    ({"prompt": "a", "stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids"),
    ({"prompt": "a", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "a", "return_token_ids": 1}, "return_token_ids"),
    ({"prompt": "a", "stream": "true"}, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "user": 5}, "user"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "a", "logit_bias": {"5": 1}}, "logit_bias"),
])
def test_every_invalid_completion_field_is_a_400_naming_it(body, param):
    e = refused(body)
    assert (e.status, e.param) == (400, param), e.message
    assert e.body()["error"]["type"] == "invalid_request_error" and param.split("_")[0] in e.message


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_every_invalid_chat_field_is_a_400_naming_it(body, param):
    e = refused(body, "chat")
    assert (e.status, e.param) == (400, param), e.message


def test_valid_bodies_parse_with_openai_defaults_and_vllm_extensions():
    p = parse({"prompt": "hi", "model": "m"}, "completion", "m", LIMITS)
    assert (p.prompts, p.max_tokens, p.n, p.temperature, p.top_p, p.top_k, p.seed, p.stream) == \
        (["hi"], None, 1, 1.0, 1.0, 0, None, False)
    p = parse({"prompt": [[1, 2], "x"], "top_k": -1, "min_p": 0.05, "ignore_eos": True, "stop_token_ids": [3],
               "return_token_ids": True, "stream": True, "stream_options": {"include_usage": True},
               "seed": 2**64 - 1, "stop": "ab", "best_of": 1, "logprobs": None}, "completion", "m", LIMITS)
    assert p.prompts == [[1, 2], "x"] and p.top_k == 0 and p.min_p == 0.05 and p.ignore_eos
    assert p.stop_token_ids == [3] and p.stop == ["ab"] and p.include_usage and p.seed == 2**64 - 1
    p = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                            {"role": "assistant", "content": None}], "max_completion_tokens": 5, "max_tokens": 9},
              "chat", "m", LIMITS)
    assert p.messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]
    assert p.max_tokens == 5


def test_unknown_model_is_a_404_and_text_needs_a_tokenizer():
    e = refused({"prompt": "a", "model": "other"})
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    bare = Limits(**{**LIMITS.__dict__, "has_tokenizer": False})
    assert refused({"prompt": "a"}, lim=bare).param == "prompt"
    assert refused({"prompt": [1], "stop": "x"}, lim=bare).param == "stop"
    assert refused({"messages": [{"role": "user", "content": "x"}]}, "chat", bare).code == "no_chat_template"
    assert parse({"prompt": [[1, 2]]}, "completion", "m", bare).prompts == [[1, 2]]


# ------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A byte-level BPE without merges: every UTF-8 byte is a token (characters span tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = tmp_path_factory.mktemp("bytes") / "tokenizer.json"
    tok.save(str(path))
    return TextModel(path, 256)


def test_detokenizer_never_splits_a_character(byte_level):
    text = "héllo wörld ✓ done"
    ids = byte_level.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span tokens
    for step in (1, 2, 3, 5):
        d = Detokenizer(byte_level, byte_level.encode("prompt: "))
        pieces = [d.add(ids[i:i + step], final=i + step >= len(ids)) for i in range(0, len(ids), step)]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stop_strings_cut_the_text_and_hold_back_what_may_begin_one(chars):
    text = TextModel(chars / "tokenizer.json", 96)
    stream = TextStream(text, encode("q"), ["END", "xyz"])
    out = [stream.feed(encode(piece), False) for piece in ("abc E", "N", "D tail")]
    assert [o[0] for o in out] == ["abc ", "", ""]  # "E", then "EN", held: they may begin END
    assert stream.stopped and stream.text == "abc " and out[2][1] == 1  # only "D" of the last piece counts
    plain = TextStream(text, encode("q"), ["END"])
    assert plain.feed(encode("abc E"), False)[0] == "abc " and plain.feed(encode("x"), True)[0] == "Ex"


def test_chat_templates_render_refuse_and_may_be_missing(chars, tmp_path):
    text = TextModel(chars / "tokenizer.json", 96)
    assert text.render_chat([{"role": "user", "content": "hi"}]) == "<user>hi|<assistant>"
    with pytest.raises(ApiError) as e:
        text.render_chat([{"role": "tool", "content": "x"}])
    assert e.value.status == 400 and "unknown role tool" in e.value.message
    bare = TextModel(char_tokenizer(tmp_path / "bare", template=None) / "tokenizer.json", 96)
    with pytest.raises(ApiError) as e:
        bare.render_chat([{"role": "user", "content": "hi"}])
    assert e.value.status == 400 and e.value.code == "no_chat_template" and "no chat template" in e.value.message


# ------------------------------------------------------------------ the app in-process


@pytest.fixture(scope="module")
def served(serve_art, chars):
    """The app on a proxy of the model (it can fail or hold decode calls), one slot, a queue of 1."""
    model = runtime.load(serve_art.path, serve_art.weights)
    proxy = Proxy(model)
    config = ServeConfig(serve_art.path, serve_art.weights, slots=SLOTS, block=2, prefill_chunk=CHUNK, max_queue=1,
                         api_key=API_KEY)
    service = Service(config, model.manifest, TextModel(chars / "tokenizer.json", 96))
    service.use(proxy)
    yield service, proxy, model
    service.shutdown()
    assert not any(t.name == "mamba2-aot-scheduler" for t in threading.enumerate())


async def _post(client, body, path="/v1/completions"):
    return await client.post(path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})


def _client(service):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)), base_url="http://test")


def test_a_full_queue_answers_429_with_retry_after(served):
    service, proxy, model = served
    proxy.gate = threading.Event()  # decode calls wait: the slots stay busy

    async def go():
        async with _client(service) as client:
            body = {"prompt": [1, 2], "max_tokens": 3, "temperature": 0}
            held = [asyncio.ensure_future(_post(client, {**body, "n": 2})) for _ in range(2)]
            while service.scheduler.busy + service.scheduler.queued < SLOTS:  # 4 sequences, none can finish
                await asyncio.sleep(0.01)
            extra = await _post(client, {**body, "n": 2})
            proxy.gate.set()
            return extra, await asyncio.gather(*held)

    try:
        extra, held = asyncio.run(go())
    finally:
        proxy.gate.set()
        proxy.gate = None
    assert extra.status_code == 429 and extra.headers["retry-after"] == "1"
    assert extra.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in held] == [200, 200]
    assert held[0].json()["choices"][0]["text"] != ""


def test_an_internal_error_answers_500_for_that_request_only(served):
    service, proxy, model = served
    proxy.fail_prefill = lambda tokens: bool((tokens == 95).any())

    async def go():
        async with _client(service) as client:
            return (await _post(client, {"prompt": [95, 1], "max_tokens": 3}),
                    await _post(client, {"prompt": [3, 4], "max_tokens": 3, "temperature": 0}))

    try:
        bad, good = asyncio.run(go())
    finally:
        proxy.fail_prefill = lambda tokens: False
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error"
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] != "" or good.json()["choices"][0]["finish_reason"] == "stop"


def test_503_while_loading(serve_art, chars):
    from runtime.format.manifest import read_manifest

    service = Service(ServeConfig(serve_art.path), read_manifest(serve_art.path))  # never loaded

    async def go():
        async with _client(service) as client:
            return [await client.get("/health"), await client.get("/v1/models"),
                    await client.post("/v1/completions", json={"prompt": [1]})]

    for r in asyncio.run(go()):
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
