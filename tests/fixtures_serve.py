"""Shared pieces of the serve tests: the tiny model exported for serving, a character tokenizer
with a chat template, a model proxy that can fail or wait, and a real server in a subprocess.

Import the fixtures into a test module (`from fixtures_serve import serve_art, ...`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

from fixtures_artifacts import HEAVY, TINY_CFG, aot_cache_env, cli_wrapper, subprocess_env  # noqa: F401
from runtime.format.manifest import Limits

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

# Long generations (cancellation, drain) and prompts of several prefill chunks.
SERVE_LIMITS = Limits(vocab_size=96, max_batch=8, max_prompt_tokens=256, max_new_tokens=65536, max_stop_tokens=4,
                      decode_block=16, max_prefill_tokens=256)
# Prompt buckets 16 and 32 (segments of 32). The test servers' shape set: slots 4 (decode at
# batch 1, 2, 4), chunks of 64 tokens (prefill at (1, 16), (1, 32), (2, 16), (2, 32), (4, 16)):
# eight programs, compiled once per session, which also cover the solo references of n <= 2.
SEGMENT, SLOTS, CHUNK = 32, 4, 64
EOS = TINY_CFG.eos_token_id
API_KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('unknown role ' + m.role) }}{% endif %}<{{ m.role }}>{{ m.content }}|"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@dataclasses.dataclass
class ServeArt:
    path: Path  # the tiny model exported with SERVE_LIMITS
    weights: Path  # its spread random weights (.safetensors)
    cache_dir: Path  # the session's XLA compile cache (shared with the servers)


_BUILT: dict[str, ServeArt] = {}


@pytest.fixture(scope="module")
def serve_art(tmp_path_factory, make_random_params, aot_cache_env) -> ServeArt:
    """The tiny model (TINY_CFG) exported with SERVE_LIMITS (segments of SEGMENT tokens), built
    once per session."""
    if "art" not in _BUILT:
        import numpy as np
        from safetensors.numpy import save_file

        from exporter.artifact import write_artifact
        from exporter.functions import ModelFunctions

        root = tmp_path_factory.mktemp("serve")
        write_artifact(ModelFunctions(TINY_CFG, jnp.float32, SERVE_LIMITS), ["cpu"], root / "tiny-serve",
                       force=False, prefill_segment=SEGMENT)
        weights = root / "weights.safetensors"
        save_file({k: np.asarray(v) for k, v in make_random_params(TINY_CFG, seed=0, std=0.2).items()}, str(weights))
        _BUILT["art"] = ServeArt(root / "tiny-serve", weights, aot_cache_env)
    return _BUILT["art"]


def char_tokenizer(folder: Path, template: str | None = CHAT_TEMPLATE) -> Path:
    """A character-level tokenizer for the tiny vocabulary: id 0 is <eos> (special), ids 1..95
    the printable ASCII characters; tokenizer_config.json carries the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<eos>": EOS, **{chr(32 + i): i + 1 for i in range(95)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<eos>"} | ({"chat_template": template} if template else {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def chars(tmp_path_factory) -> Path:
    return char_tokenizer(tmp_path_factory.mktemp("tok") / "chars")


def encode(text: str) -> list[int]:
    """The character tokenizer's ids, without loading it."""
    return [ord(ch) - 31 for ch in text]


class Proxy:
    """A model that behaves as `model` except where told: `fail_prefill(tokens)` / `fail_decode()`
    raise to simulate an internal error; `gate` (a threading.Event) holds every decode call."""

    def __init__(self, model):
        self._model = model
        self.fail_prefill = lambda tokens: False
        self.fail_decode = lambda: False
        self.gate: threading.Event | None = None
        self.decode_batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def prefill(self, tokens, lengths, state=None):
        if self.fail_prefill(tokens):
            raise RuntimeError("injected prefill failure")
        return self._model.prefill(tokens, lengths, state)

    def decode(self, state, logits, finished, *args):
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_decode():
            raise RuntimeError("injected decode failure")
        self.decode_batches.append(len(finished))
        return self._model.decode(state, logits, finished, *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mamba2-aot serve` in a subprocess (behind the import blocker of the model-free runtime)
    on an ephemeral 127.0.0.1 port; always stopped by its process id."""

    def __init__(self, art: Path, weights: Path, cache_dir: Path, *args: str):
        env = subprocess_env(cache_dir)
        cmd = [sys.executable, "-c", cli_wrapper(HEAVY), "serve", str(art), "--weights", str(weights),
               "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[1])
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.url = "http://127.0.0.1:" + self._wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 120)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m.group(1) if m.groups() else line
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader's last lines
                raise AssertionError(f"server exited ({self.proc.returncode}):\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} from the server in {timeout}s:\n" + "\n".join(self.lines[-30:]))

    def wait_ready(self, timeout: float = 240) -> list[int]:
        """Poll /health until 200: the statuses seen on the way."""
        import httpx

        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen.append(httpx.get(self.url + "/health", timeout=5).status_code)
            except httpx.TransportError:
                seen.append(None)
            if seen[-1] == 200:
                return seen
            assert self.proc.poll() is None, "\n".join(self.lines[-30:])
            time.sleep(0.05)
        raise AssertionError("server not ready:\n" + "\n".join(self.lines[-30:]))

    def log_lines(self, pattern: str) -> list[str]:
        return [ln for ln in self.lines if re.search(pattern, ln)]

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a drain), then wait; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)

    def leaked(self) -> list[str]:
        """Blocked packages the server imported (reported by the import blocker at exit)."""
        line = [ln for ln in self.lines if ln.startswith("LEAKED=")][-1]
        return [m for m in line[len("LEAKED="):].split(",") if m]


def metric(text: str, name: str, labels: str = "") -> float | None:
    """A sample's value from Prometheus text (None if absent)."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))
