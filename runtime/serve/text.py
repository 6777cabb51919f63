"""Text for the server: the tokenizer (HF `tokenizers`), its chat template (jinja2, sandboxed),
incremental detokenization and stop strings."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from runtime.errors import Mamba2AOTError
from runtime.serve.errors import ApiError

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one (keeps its leading space)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path) -> str | None:
    """tokenizer_config.json's chat_template (a string, or the "default" of a named list), else a
    chat_template.jinja file beside it."""
    config = _read_config(folder)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template.strip():
        return template
    path = folder / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _read_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Mamba2AOTError(f"cannot read {path}: {e}") from None
    return config if isinstance(config, dict) else {}


class TextModel:
    """A tokenizer.json with the chat template and special tokens of its tokenizer_config.json."""

    def __init__(self, path: Path, vocab_size: int):
        from runtime.extras import optional_import

        tokenizers = optional_import("tokenizers")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's
            raise Mamba2AOTError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise Mamba2AOTError(f"the tokenizer {path} has {size} tokens, more than the model's vocabulary of "
                                 f"{vocab_size}: pass the model's own tokenizer with --tokenizer")
        self.path = path
        config = _read_config(path.parent)
        self.special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                        if (t := _token_text(config.get(k))) is not None}
        self.chat_template = _chat_template(path.parent)
        self._template = _compile_template(self.chat_template, path.parent) if self.chat_template else None

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for `messages` (with the assistant's generation prompt); 400 when the
        model has no template or the template refuses the messages."""
        if self._template is None:
            raise ApiError(400, "this model has no chat template (its tokenizer_config.json has no chat_template): "
                                "use /v1/completions", param="messages", code="no_chat_template")
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special)
        except Exception as e:  # noqa: BLE001 - raise_exception() and any failure on these messages
            raise ApiError(400, f"the chat template refused the messages: {' '.join(str(e).split())[:300]}",
                           param="messages") from None


def _compile_template(source: str, where: Path):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise Mamba2AOTError("chat templates need jinja2: pip install 'mamba2-aot[serve]'") from None

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, indent=None, **_):
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise Mamba2AOTError(f"the chat template in {where} does not compile: {e}") from None


def find_tokenizer(tokenizer: Path | None, weights) -> Path | None:
    """--tokenizer (a tokenizer.json or a directory holding one), else the tokenizer.json beside
    --weights, else None (prompts must then be token ids)."""
    if tokenizer is not None:
        path = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
        if not path.is_file():
            raise Mamba2AOTError(f"--tokenizer {tokenizer}: no such file" if not tokenizer.exists() else
                                 f"--tokenizer {tokenizer}: no tokenizer.json in that directory")
        return path
    if isinstance(weights, Path):  # a checkpoint (not "random")
        path = (weights if weights.is_dir() else weights.parent) / "tokenizer.json"
        if path.is_file():
            return path
    return None


class Detokenizer:
    """Text of tokens arriving in pieces: each piece's new text, never half a character (a
    window of the previous tokens is decoded with the new ones, so spaces and multi-byte
    characters come out as the whole sequence would decode)."""

    def __init__(self, text: TextModel, context: list[int]):
        self.text = text
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.prefix = 0  # the window starts here
        self.read = len(self.ids)  # tokens up to here are already text

    def add(self, tokens: list[int], final: bool = False) -> str:
        self.ids.extend(tokens)
        before = self.text.decode(self.ids[self.prefix:self.read])
        after = self.text.decode(self.ids[self.prefix:])
        if not final and (len(after) < len(before) or after.endswith("\ufffd")):
            return ""  # an incomplete character: wait for its next bytes
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class TextStream:
    """One choice's text: new tokens in, the text the client may see out, cut at the first stop
    string (which is not included). Text that might begin a stop string is held back until
    the next tokens decide it."""

    def __init__(self, text: TextModel | None, prompt: list[int], stops: list[str]):
        self.detok = Detokenizer(text, prompt) if text is not None else None
        self.stops = stops
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters handed out
        self.stopped = False

    def feed(self, tokens: list[int], final: bool) -> tuple[str, int]:
        """(new text to send, how many of `tokens` count: fewer when a stop string ends early)."""
        if self.detok is None or self.stopped:
            return "", len(tokens) if self.detok is None else 0
        if not self.stops:
            self.text += self.detok.add(tokens, final)
            return self._take(final), len(tokens)
        for k, token in enumerate(tokens):  # one by one: the token that completes a stop string ends it
            last = final and k == len(tokens) - 1
            start = max(0, len(self.text) - max(map(len, self.stops)) + 1)
            self.text += self.detok.add([token], last)
            hit = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hit:
                self.text = self.text[:min(hit)]
                self.stopped = True
                return self._take(True), k + 1
        if final and not tokens:
            self.text += self.detok.add([], True)
        return self._take(final), len(tokens)

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
