"""The committed artifacts `tests/fixtures/tiny-cpu-v1/` (schema 1, written by
scripts/make_fixture.py with mamba2-aot 0.1.0) and `tiny-cpu-v2/` (schema 2, 0.2.0) keep loading
and generating the same greedy tokens with the current runtime, or, where they cannot (this jax
is outside their compatibility window, this machine is not cpu), are refused with a clear
CompatibilityError. Never regenerate them to make this test pass: a failure here means
artifacts users already have would break.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import runtime
from runtime.format.compat import current_platform, in_jax_window
from runtime.errors import CompatibilityError
from runtime.format.integrity import verify_files
from runtime.format.manifest import read_manifest
from test_errors_api import isolated_compile_cache  # noqa: F401
from test_errors_cli import cli

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(params=["tiny-cpu-v1", "tiny-cpu-v2"])
def fixture(request):
    """(artifact dir, weights dir, expected.json) of one committed fixture."""
    root = FIXTURES / request.param
    return root / "artifact", root / "weights", json.loads((root / "expected.json").read_text())


def _runnable_here(manifest) -> str | None:
    """Why this runtime must refuse the fixture (None: it must run it)."""
    if not in_jax_window(manifest):
        return "jax"
    if current_platform() not in manifest.platforms:
        return "platform"
    return None


def test_fixture_is_intact_and_small(fixture):
    ARTIFACT, WEIGHTS, EXPECTED = fixture
    FIXTURE = ARTIFACT.parent
    manifest = read_manifest(ARTIFACT)
    verify_files(ARTIFACT, manifest)
    assert manifest.platforms == ("cpu",) and manifest.dtype == "float32"
    assert manifest.producer.version == EXPECTED["made_with"]["mamba2-aot"]
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 300_000, size


def test_fixture_generates_expected_tokens(fixture):
    ARTIFACT, WEIGHTS, EXPECTED = fixture
    manifest = read_manifest(ARTIFACT)
    why = _runnable_here(manifest)
    if why is not None:
        with pytest.raises(CompatibilityError) as e:
            runtime.load(ARTIFACT, WEIGHTS)
        message = str(e.value)
        assert "\n" not in message and "re-export" in message
        if why == "jax":  # names both versions
            c = manifest.compatibility
            assert f"[{c.jax_min}, {c.jax_max_exclusive})" in message and jax.__version__ in message
        else:
            assert "platforms [cpu]" in message
        return
    model = runtime.load(ARTIFACT, WEIGHTS)
    assert model.limits["vocab_size"] == manifest.limits.vocab_size
    # (0.1.0 had no default eos stop: ignore_eos asks for exactly what it generated)
    tokens = model.generate(EXPECTED["prompts"], EXPECTED["max_new_tokens"], stop=EXPECTED["stop"],
                            ignore_eos=True)
    assert tokens == EXPECTED["tokens"]
    # What a schema-1 artifact cannot do is refused in one line; a schema-2 one carries states.
    if manifest.semantics_version == 1:
        with pytest.raises(runtime.RequestError, match="re-export"):
            model.complete(EXPECTED["prompts"], 2, return_states=True)
        with pytest.raises(runtime.RequestError, match="one set of sampling settings per batch"):
            model.generate(EXPECTED["prompts"], 2, temperature=[0.0, 0.5])
    else:
        first, rest = EXPECTED["prompts"][0][:4], EXPECTED["prompts"][0][4:]
        state = model.prefill_state(first)
        assert model.generate([rest], EXPECTED["max_new_tokens"], states=[state], ignore_eos=True) == \
            [EXPECTED["tokens"][0]]


def test_refusal_branch_under_a_future_jax(monkeypatch, fixture):
    """What a jax past the fixture's window sees: the refusal branch above, exercised today."""
    manifest = read_manifest(fixture[0])
    monkeypatch.setattr(jax, "__version__", f"{int(manifest.compatibility.jax_max_exclusive.split('.')[0]) + 1}.0.0")
    assert _runnable_here(manifest) == "jax"
    test_fixture_generates_expected_tokens(fixture)


def test_fixture_through_cli(capfd, fixture):
    ARTIFACT, WEIGHTS, EXPECTED = fixture
    manifest = read_manifest(ARTIFACT)
    if _runnable_here(manifest) is not None:
        pytest.skip("the fixture cannot run here (test_fixture_generates_expected_tokens checks the refusal)")
    # The CLI stops at the model's eos by default: --ignore-eos, and a stop id no row produces.
    stop = next(i for i in range(manifest.limits.vocab_size) if all(i not in row for row in EXPECTED["tokens"]))
    args = [a for p in EXPECTED["prompts"] for a in ("--prompt-ids", ",".join(map(str, p)))]
    code, out, err = cli(capfd, "generate", ARTIFACT, "--weights", WEIGHTS, *args, "--max-new-tokens",
                         EXPECTED["max_new_tokens"], "--stop-id", stop, "--ignore-eos", "--json")
    assert code == 0, err
    assert json.loads(out) == {"tokens": EXPECTED["tokens"]}


def _script():
    spec = importlib.util.spec_from_file_location("make_fixture", REPO / "scripts" / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_describes_the_fixture(fixture):
    """scripts/make_fixture.py still makes this fixture: same model, limits, prompts, weights."""
    ARTIFACT, WEIGHTS, EXPECTED = fixture
    script = _script()
    manifest = read_manifest(ARTIFACT)
    config = manifest.model["config"]
    assert {k: config[k] for k in script.CONFIG} == script.CONFIG
    assert {k: getattr(manifest.limits, k) for k in script.LIMITS} == script.LIMITS
    assert EXPECTED["prompts"] == script.PROMPTS and EXPECTED["max_new_tokens"] == script.MAX_NEW_TOKENS
    stored = load_file(str(WEIGHTS / "model.safetensors"))
    made = script.make_weights(manifest.weights)
    assert set(stored) == set(made)
    for name, arr in made.items():
        np.testing.assert_array_equal(stored[name], arr, err_msg=name)
    hf = json.loads((WEIGHTS / "config.json").read_text())
    assert {k: hf[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == {
        k: script.CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
