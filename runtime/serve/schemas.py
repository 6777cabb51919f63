"""OpenAI request bodies checked into `Params`, and the response and chunk shapes.

Fields as OpenAI names them, plus vLLM's extensions (top_k, min_p, ignore_eos, stop_token_ids,
return_token_ids). Every invalid field is a 400 naming it; fields this server cannot honour
(logprobs, penalties, tools, ...) are refused unless they hold their "off" value; unknown
fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral, Real

from runtime.serve.errors import ApiError, invalid

MAX_STOP_STRINGS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")

# field -> the values that mean "not used" (anything else: 400, not supported)
_OFF = {
    "completion": {"logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
                   "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                   "repetition_penalty": (None, 1)},
    "chat": {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
             "frequency_penalty": (None, 0), "logit_bias": (None, {}), "repetition_penalty": (None, 1),
             "tools": (None, []), "functions": (None, []), "function_call": (None, "none"),
             "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
             "prediction": (None,)},
}


@dataclasses.dataclass
class Limits:
    """What a request may ask of this server: the artifact's limits and the slot queue."""

    vocab_size: int
    max_new_tokens: int
    max_prompt_tokens: int
    max_batch: int
    max_stop_tokens: int
    max_sequences: int  # slots + max queue: sequences one request may need
    has_tokenizer: bool


@dataclasses.dataclass
class Params:
    """A checked completion or chat request."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list  # completion: strings and token-id lists; chat: empty
    messages: list[dict] | None
    max_tokens: int | None  # None: the endpoint's default
    n: int
    stream: bool
    include_usage: bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    return_token_ids: bool
    user: str | None


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _int(body: dict, name: str, default, lo: int, hi: int, what: str = ""):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or not lo <= v <= hi:
        raise invalid(name, f"{name} must be an integer in [{lo}, {hi}]{what}, got {v!r:.60}")
    return int(v)


def _real(body: dict, name: str, default: float, ok, rule: str) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or not ok(float(v)):
        raise invalid(name, f"{name} must be a number {rule}, got {v!r:.60}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"{name} must be true or false, got {v!r:.60}")
    return v


def _token_ids(v, name: str, vocab: int) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise invalid(name, f"{name} must be a list of integer token ids")
    bad = [t for t in v if not 0 <= t < vocab]
    if bad:
        raise invalid(name, f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    return [int(t) for t in v]


def _prompts(v, lim: Limits) -> list:
    """prompt: a string, a token-id list, or a non-empty list of either (a batch)."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(_is_int(t) for t in v)):
        v = [v]
    if not isinstance(v, list) or not v:
        raise invalid("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either")
    out = []
    for p in v:
        if isinstance(p, str):
            if not lim.has_tokenizer:
                raise invalid("prompt", "this server has no tokenizer: send prompts as token ids "
                                        "(or start it with --tokenizer)")
            out.append(p)
        elif isinstance(p, list):
            if not p:
                raise invalid("prompt", "prompt has an empty token-id list")
            out.append(_token_ids(p, "prompt", lim.vocab_size))
        else:
            raise invalid("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either")
    return out


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid("messages", f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise invalid("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(part["text"] for part in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")
        msg = {"role": m["role"], "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _stop(v, lim: Limits) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    if stops and not lim.has_tokenizer:
        raise invalid("stop", "stop strings need a tokenizer (start the server with --tokenizer); "
                              "use stop_token_ids instead")
    return stops


def parse(body: dict, kind: str, served: str, lim: Limits) -> Params:
    """Check a /v1/completions (kind "completion") or /v1/chat/completions ("chat") body."""
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r:.80} does not exist: this server serves {served!r}",
                       param="model", code="model_not_found")
    for name, off in _OFF[kind].items():
        if name in body and body[name] not in off and not (name == "best_of" and body[name] == body.get("n")):
            raise invalid(name, f"{name} is not supported by this server")
    if kind == "completion":
        if "prompt" not in body:
            raise invalid("prompt", "prompt is required")
        prompts, messages = _prompts(body["prompt"], lim), None
        max_tokens = _int(body, "max_tokens", None, 1, lim.max_new_tokens, " (the artifact's cap)")
    else:
        if not lim.has_tokenizer:
            raise ApiError(400, "chat needs a tokenizer with a chat template: start the server with --tokenizer",
                           param="messages", code="no_chat_template")
        prompts, messages = [], _messages(body.get("messages"))
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, name, None, 1, lim.max_new_tokens, " (the artifact's cap)")
    n = _int(body, "n", 1, 1, lim.max_batch, " (the artifact's batch limit)")
    sequences = n * max(len(prompts), 1)
    if sequences > lim.max_sequences:
        raise invalid("n" if n > 1 else "prompt", f"this request needs {sequences} sequences, more than the server "
                      f"holds ({lim.max_sequences}: slots plus queue)")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise invalid("stream_options", "stream_options must be an object, and only with stream: true")
    top_k = _int(body, "top_k", 0, -1, 2**31 - 1)
    seed = _int(body, "seed", None, 0, 2**64 - 1)
    stop_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else _token_ids(stop_ids, "stop_token_ids", lim.vocab_size)
    if len(stop_ids) > lim.max_stop_tokens:
        raise invalid("stop_token_ids", f"at most {lim.max_stop_tokens} stop_token_ids (the artifact's limit)")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "user must be a string")
    return Params(
        kind=kind, model=served, prompts=prompts, messages=messages, max_tokens=max_tokens, n=n, stream=stream,
        include_usage=_bool(options or {}, "include_usage"),
        temperature=_real(body, "temperature", 1.0, lambda x: x >= 0, ">= 0 (0 = greedy)"),
        top_p=_real(body, "top_p", 1.0, lambda x: 0 < x <= 1, "in (0, 1]"),
        top_k=max(top_k, 0),  # -1 (vLLM) and 0 both mean off
        min_p=_real(body, "min_p", 0.0, lambda x: 0 <= x < 1, "in [0, 1)"),
        seed=seed, stop=_stop(body.get("stop"), lim), stop_token_ids=stop_ids,
        ignore_eos=_bool(body, "ignore_eos"), return_token_ids=_bool(body, "return_token_ids"), user=user)


# -- response shapes ----------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _object(kind: str, chunk: bool) -> str:
    return ("chat.completion" if kind == "chat" else "text_completion") + (".chunk" if chunk and kind == "chat" else "")


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict], chunk: bool = False,
             usage_: dict | None = None, with_usage: bool = True) -> dict:
    """The body (or SSE chunk) around `choices`."""
    out = {"id": rid, "object": _object(kind, chunk), "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = usage_
    return out


def choice(kind: str, index: int, text: str, finish_reason: str | None, token_ids: list[int] | None = None,
           prompt_ids: list[int] | None = None) -> dict:
    """A whole choice of a (non-streamed) response."""
    if kind == "chat":
        out = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": finish_reason}
    else:
        out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        out["token_ids"] = token_ids
    if prompt_ids is not None:
        out["prompt_token_ids"] = prompt_ids
    return out


def delta(kind: str, index: int, text: str | None, finish_reason: str | None, token_ids: list[int] | None = None,
          role: bool = False) -> dict:
    """One choice's part of a streamed chunk (chat: a delta; role=True: the opening one)."""
    if kind == "chat":
        d = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        out = {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    else:
        out = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out
