"""The thin runtime: an artifact + weights generate exactly what the live model does, without
importing model code; the `generate` / `inspect` commands; compile cache; checks and limits."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest

import runtime
import runtime.tools.cli
from fixtures_artifacts import (HEAVY, PROMPTS, TINY_LIMITS, aot_cache_env, blocker_prelude,  # noqa: F401
                                last_json, leaked, run_cli, run_python, subprocess_env, tiny)
from runtime.errors import RequestError, WeightsError

SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=2024)
EOS = 0  # TINY_CFG.eos_token_id: the CLI's default stop id


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`mamba2-aot ARGS` in this process (same entry point, no interpreter start-up)."""
    with pytest.raises(SystemExit) as e:
        runtime.tools.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def ids_arg(prompt) -> str:
    return ",".join(map(str, prompt))


# ------------------------------------------------------------------ runtime == live model


@pytest.mark.parametrize("kw", [{}, SAMPLED, dict(stop="greedy step 5")], ids=["greedy", "sampled", "stop"])
def test_generate_equals_live_model(tiny, kw):
    if kw.get("stop") == "greedy step 5":  # a stop token row 0 hits at step 5 at the latest
        kw = dict(stop=[tiny.model.generate(PROMPTS, 32)[0][5]])
    got = tiny.model.generate(PROMPTS, 32, **kw)
    assert got == tiny.live_generate(PROMPTS, 32, **kw)
    if "stop" in kw:
        assert len(got[0]) <= 6 and got[0][-1] == kw["stop"][0]
    else:
        assert [len(r) for r in got] == [32] * len(PROMPTS)


@pytest.mark.parametrize("block", [1, 3, 7])
@pytest.mark.parametrize("kw", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_stream_blocks_concatenate_to_generate(tiny, kw, block):
    free = tiny.model.generate(PROMPTS, 32, **kw)
    stop = [free[0][10]]  # row 0 stops within 11 tokens; the others may or may not
    full = tiny.model.generate(PROMPTS, 32, stop=stop, **kw)
    assert full[0][-1] == stop[0] and len(full[0]) <= 11
    gens = list(tiny.model.stream(PROMPTS, 32, block=block, stop=stop, **kw))
    assert all(len(row) <= block for g in gens for row in g.tokens)
    assert [sum((g.tokens[i] for g in gens), []) for i in range(len(PROMPTS))] == full
    assert gens[-1].finished[0] and len(gens) <= math.ceil(32 / block)
    # Once a row is finished it gets no more tokens.
    done = [i for i, g in enumerate(gens) if g.finished[0]][0]
    assert all(g.tokens[0] == [] for g in gens[done + 1:])


# ------------------------------------------------------------------ separate processes, no model code

_EXPORT = """
import sys
import jax.numpy as jnp
from pathlib import Path
from exporter.artifact import write_artifact
from exporter.functions import ModelFunctions
from fixtures_artifacts import TINY_CFG, TINY_LIMITS
write_artifact(ModelFunctions(TINY_CFG, jnp.float32, TINY_LIMITS), ["cpu"], Path(sys.argv[1]), force=False)
print("exported")
"""

_RUN = blocker_prelude(HEAVY) + """
import json
import runtime
art, weights, prompts, sampled = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = runtime.load(art, weights)
print(json.dumps({"greedy": model.generate(prompts, 32), "sampled": model.generate(prompts, 32, **sampled),
                  "leaked": _leaked()}))
"""


def test_export_in_one_process_run_in_another_without_model_code(tiny, tmp_path):
    env = subprocess_env(tiny.cache_dir)
    art = tmp_path / "art"
    r = run_python(_EXPORT, art, env=env)
    assert r.returncode == 0 and "exported" in r.stdout, r.stderr
    r = run_python(_RUN, art, tiny.weights, json.dumps(PROMPTS), json.dumps(SAMPLED), env=env)
    assert r.returncode == 0, r.stderr
    got = last_json(r.stdout)
    assert got["leaked"] == []  # neither exporter, flax, tensorflow nor torch was imported
    assert got["greedy"] == tiny.live_generate(PROMPTS, 32)
    assert got["sampled"] == tiny.live_generate(PROMPTS, 32, **SAMPLED)


def test_cli_generate_and_inspect_without_model_code(tiny):
    env = subprocess_env(tiny.cache_dir)
    args = [a for p in PROMPTS for a in ("--prompt-ids", ids_arg(p))]
    r = run_cli("generate", tiny.path, "--weights", tiny.weights, *args, "--max-new-tokens", "32",
                "--temperature", "0.8", "--top-k", "40", "--seed", "2024", "--json", env=env, blocked=HEAVY)
    assert r.returncode == 0, r.stderr
    assert leaked(r.stderr) == []
    assert json.loads(r.stdout) == {"tokens": tiny.live_generate(PROMPTS, 32, temperature=0.8, top_k=40,
                                                                 seed=2024, stop=[EOS])}
    r = run_cli("inspect", tiny.path, env=env, blocked=HEAVY)
    assert r.returncode == 0, r.stderr
    assert leaked(r.stderr) == []
    assert "tiny96" in r.stdout and "cpu/decode.jaxexport" in r.stdout


# ------------------------------------------------------------------ a transformers checkpoint


@pytest.fixture(scope="module")
def hf_art(tiny_hf, tmp_path_factory, aot_cache_env):
    """The tiny HF checkpoint exported by `mamba2-aot export` (its own process), 64 new tokens."""
    out = tmp_path_factory.mktemp("hf-artifact") / "art"
    r = run_cli("export", "--model", tiny_hf.path, "--out", out, "--max-new-tokens", "64", "--max-batch", "2",
                "--max-prompt-tokens", "32", env=subprocess_env(aot_cache_env))
    assert r.returncode == 0, r.stderr
    return out


def test_hf_checkpoint_greedy_matches_transformers(tiny_hf, hf_art, capsys):
    import hf_reference

    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 200, n).tolist() for n in (7, 23)]  # 23 crosses the chunk of 16
    expected = [hf_reference.hf_greedy(tiny_hf.hf_model, p, 64)[0] for p in prompts]
    # eos is 0: stop on an id HF never emits instead, so neither side stops early.
    stop = min(set(range(200)) - {t for row in expected for t in row})
    code, out, err = run_main(capsys, "generate", hf_art, "--weights", tiny_hf.path,
                              *[a for p in prompts for a in ("--prompt-ids", ids_arg(p))],
                              "--max-new-tokens", "64", "--stop-id", stop, "--json")
    assert code == 0, err
    assert json.loads(out) == {"tokens": expected}
    assert all(len(row) == 64 for row in expected)


def _with_tokenizer(ckpt, dest):
    from tokenizers import Tokenizer, models, pre_tokenizers

    dest.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpt / name, dest / name)
    words = ["[UNK]", "hello", "world", "the", "mamba", "snake", "state", "space"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dest / "tokenizer.json"))
    return dest


def test_prompt_text_uses_the_checkpoint_tokenizer(tiny_hf, hf_art, tmp_path, capsys):
    ckpt = _with_tokenizer(tiny_hf.path, tmp_path / "ckpt")
    common = ["--weights", ckpt, "--max-new-tokens", "8", "--stop-id", "199", "--json"]
    code, out, err = run_main(capsys, "generate", hf_art, "--prompt", "hello mamba state space", *common)
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    assert len(tokens) == 1 and 1 <= len(tokens[0]) <= 8
    code, out2, err = run_main(capsys, "generate", hf_art, "--prompt-ids", "1,4,6,7", *common)
    assert code == 0, err
    assert json.loads(out2)["tokens"] == tokens  # the text went through tokenizer.json
    code, out, err = run_main(capsys, "generate", hf_art, "--prompt", "hello world", *common[:-1])
    assert code == 0, err
    assert out.startswith("[0] ")  # decoded with the same tokenizer


def test_prompt_text_without_tokenizer_says_so(tiny_hf, hf_art, tiny, capsys):
    for weights in (["--weights", tiny_hf.path], ["--weights", "random"], []):
        art = hf_art if weights else tiny.path
        code, out, err = run_main(capsys, "generate", art, *weights, "--prompt", "hello")
        line = one_line_error(err)
        assert code == 2 and out == ""
        assert "tokenizer.json" in line and "--prompt-ids" in line


def test_random_weights_only_when_asked_for_and_json_is_exact(tiny, capsys):
    args = ["--prompt-ids", ids_arg(PROMPTS[0]), "--prompt-ids", ids_arg(PROMPTS[2]), "--max-new-tokens", "6"]
    code, out, err = run_main(capsys, "generate", tiny.path, *args, "--json")  # no --weights: refused
    assert code == 2 and out == ""
    assert 'no weights given' in one_line_error(err) and '"random"' in one_line_error(err)
    with pytest.raises(WeightsError, match='no weights given.*"random"'):
        runtime.load(tiny.path)

    code, out, err = run_main(capsys, "generate", tiny.path, *args, "--weights", "random", "--json")
    assert code == 0, err
    assert err.splitlines() == ["warning: using seeded random weights (seed 0), as asked: the outputs are "
                                "meaningless"]
    with pytest.warns(RuntimeWarning, match="using seeded random weights"):
        model = runtime.load(tiny.path, "random")
    assert model.warnings == ["using seeded random weights (seed 0), as asked: the outputs are meaningless"]
    expected = model.generate([PROMPTS[0], PROMPTS[2]], 6, stop=[EOS])
    assert out == json.dumps({"tokens": expected}) + "\n"
    assert set(json.loads(out)) == {"tokens"}


# ------------------------------------------------------------------ compile cache

_FIRST_TOKEN = """
import time
t0 = time.perf_counter()
import json, sys
from runtime.engine.model import load
model = load(sys.argv[1], sys.argv[2])
t_load = time.perf_counter()
first = next(model.stream(json.loads(sys.argv[3]), 8, block=1))
t1 = time.perf_counter()
print(json.dumps({"first_token_s": t1 - t0, "load_s": t_load - t0, "tokens": first.tokens}))
"""


def test_compile_cache_populated_by_first_process_reused_by_second(tiny, tmp_path, record_property):
    cache = tmp_path / "xla-cache"
    env = subprocess_env(cache)
    runs = []
    for _ in range(2):
        r = run_python(_FIRST_TOKEN, tiny.path, tiny.weights, json.dumps(PROMPTS), env=env)
        assert r.returncode == 0, r.stderr
        runs.append(last_json(r.stdout))
        if len(runs) == 1:
            entries = [p for p in cache.rglob("*") if p.is_file()]
            assert entries, "the first process wrote nothing into MAMBA2_AOT_CACHE_DIR"
    assert runs[0]["tokens"] == runs[1]["tokens"]
    cold, warm = runs[0]["first_token_s"], runs[1]["first_token_s"]
    record_property("first_token_cold_s", round(cold, 3))
    record_property("first_token_warm_s", round(warm, 3))
    print(f"\nfirst token from process start: cold cache {cold:.2f} s, warm cache {warm:.2f} s "
          f"({len(entries)} cache entries)")


# ------------------------------------------------------------------ weights vs manifest


def test_weights_of_another_config_fail_before_device_work(hf_art, tiny_hf_groups, tiny, monkeypatch, capsys):
    def no_device_work(*a, **k):
        raise AssertionError("the artifact was deserialized before the weights were checked")

    with monkeypatch.context() as mp:
        mp.setattr(jax.export, "deserialize", no_device_work)
        with pytest.raises(WeightsError) as e:
            runtime.load(hf_art, tiny_hf_groups.path)
        msg = str(e.value)
        assert "\n" not in msg
        assert "n_groups 2 != 1" in msg and "num_hidden_layers 3 != 2" in msg
        # A bare .safetensors file (no config.json) of another model: the tensor is named.
        with pytest.raises(WeightsError, match="backbone.embeddings.weight"):
            runtime.load(hf_art, tiny.weights)
    code, out, err = run_main(capsys, "generate", hf_art, "--weights", tiny_hf_groups.path, "--prompt-ids", "1,2")
    assert code == 2 and "n_groups" in one_line_error(err)


# ------------------------------------------------------------------ request limits

V, CAP = 96, TINY_LIMITS.max_new_tokens


@pytest.mark.parametrize("call, match", [
    (dict(prompts=[[1]] * 9), r"batch of 9 prompts is over the artifact's limit of 8"),
    (dict(prompts=[[1] * 65]), r"prompt 0 has 65 tokens, over the artifact's limit of 64"),
    (dict(prompts=[[1, 2], [3, V]]), rf"prompt 1 has token id {V} outside the vocabulary \[0, {V}\)"),
    (dict(prompts=[[-1]]), r"token id -1 outside the vocabulary"),
    (dict(prompts=[[1], []]), r"prompt 1 is empty"),
    (dict(prompts=[]), r"non-empty list"),
    (dict(max_new_tokens=0), rf"max_new_tokens must be in \[1, {CAP}\]"),
    (dict(max_new_tokens=CAP + 1), rf"max_new_tokens must be in \[1, {CAP}\].*got {CAP + 1}"),
    (dict(temperature=-0.5), r"temperature must be >= 0"),
    (dict(temperature=float("nan")), r"temperature must be >= 0"),
    (dict(top_k=-1), r"top_k must be an integer >= 0"),
    (dict(top_k=2.5), r"top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\)"),
    (dict(stop=[1, 2, 3, 4, 5]), r"5 stop tokens, over the artifact's limit of 4"),
    (dict(stop=[V]), rf"stop token {V} is outside the vocabulary"),
    (dict(seed=-1), r"seed must be an integer >= 0"),
    (dict(seed=[1, 2]), r"seed must be an integer >= 0 \(below 2\*\*64\) or a list of 1"),
    (dict(block=0), r"block must be a positive integer"),
], ids=lambda v: "" if isinstance(v, str) else "-".join(f"{k}={str(x)[:12]}" for k, x in v.items()))
def test_requests_outside_the_limits_are_clear_errors(tiny, call, match, monkeypatch):
    def no_device_work(*a, **k):
        raise AssertionError("a bad request reached the device")

    monkeypatch.setattr(tiny.model, "prefill", no_device_work)
    kw = {"prompts": [[1, 2, 3]], "max_new_tokens": 8, **call}
    with pytest.raises(RequestError, match=match) as e:
        list(tiny.model.stream(**kw))
    assert "\n" not in str(e.value)


def test_cli_request_limit_is_one_line(tiny, capsys):
    code, out, err = run_main(capsys, "generate", tiny.path, "--weights", tiny.weights, "--prompt-ids", "1,2",
                              "--max-new-tokens", CAP + 1)
    assert code == 2 and out == ""
    assert "max_new_tokens must be in [1, 32]" in one_line_error(err)
