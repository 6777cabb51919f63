"""Start-up path: weights copied once into aligned buffers the CPU device adopts, and programs
compiled ahead of use (`prepare`, and the shapes the previous process used)."""

from __future__ import annotations

import json
import threading

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import runtime
from fixtures_artifacts import PROMPTS, aot_cache_env, run_python, subprocess_env, tiny  # noqa: F401
from runtime.engine import compile_cache
from runtime.engine.checkpoints import open_checkpoint
from runtime.errors import RequestError, WeightsError
from runtime.format.manifest import read_manifest
from runtime.engine.programs import Programs
from runtime.engine.weights import host_buffer, to_device


def _pointer(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [np.float32, np.dtype(ml_dtypes.bfloat16), np.int8])
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (7, 1, 3)])
def test_host_buffer_is_aligned_and_adopted_without_a_copy(shape, dtype):
    buf = host_buffer(shape, dtype)
    assert buf.shape == shape and buf.dtype == np.dtype(dtype)
    assert _pointer(buf) % 64 == 0
    buf[...] = np.arange(buf.size).reshape(shape).astype(dtype)
    on_device = to_device({"w": buf})["w"]
    np.testing.assert_array_equal(np.asarray(on_device), buf)
    if jax.default_backend() == "cpu" and buf.size:
        assert on_device.unsafe_buffer_pointer() == _pointer(buf)  # adopted, not copied


def test_safetensors_reads_are_views_of_the_file_equal_to_safe_open(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {  # odd sizes: data offsets are not aligned to anything
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "c": rng.standard_normal((2, 3, 1)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "d": rng.standard_normal((11,)).astype(np.float64),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    with open_checkpoint(path) as ckpt, safe_open(str(path), framework="numpy") as ref:
        for name, want in tensors.items():
            got = ckpt.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
            np.testing.assert_array_equal(got.view(np.uint8), ref.get_tensor(name).view(np.uint8))
            assert not got.flags.writeable  # a read-only map of the file


def test_safetensors_changed_under_an_open_checkpoint_is_refused(tmp_path):
    """Data is read through the file's own header at read time: a file replaced after its
    metadata was checked (here `a` one float shorter) is refused, never misread."""
    path = tmp_path / "t.safetensors"
    save_file({"a": np.ones((4,), np.float32), "b": np.ones((2,), np.float32)}, str(path))
    with open_checkpoint(path) as ckpt:  # names, shapes and dtypes read now
        save_file({"a": np.ones((3,), np.float32), "b": np.ones((2,), np.float32)}, str(path))
        with pytest.raises(WeightsError, match="does not fit its dtype and shape"):
            ckpt.read("a")
    with open_checkpoint(path) as ckpt:
        np.testing.assert_array_equal(ckpt.read("a"), np.ones((3,), np.float32))


def test_loaded_weights_sit_in_aligned_buffers(tiny):
    from runtime.engine.weights import load_weights

    arrays = load_weights(tiny.weights, tiny.model.manifest.weights)
    assert all(_pointer(a) % 64 == 0 for a in arrays.values())
    for name, a in arrays.items():
        np.testing.assert_array_equal(a, np.asarray(tiny.params[name]))


# ------------------------------------------------------------------ programs


def _submitted(model) -> set:
    return {(p["function"], p["dims"]["b"], p["dims"].get("t")) for p in model.programs()}


def test_next_process_prepares_the_shapes_this_one_used(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "cache"))
    first = runtime.load(tiny.path, tiny.weights)
    assert _submitted(first) == set()  # nothing remembered yet: nothing compiled before use
    want = first.generate(PROMPTS[:2], 6)  # batch bucket 2, prompt bucket 16
    shapes_dir = tmp_path / "cache" / "shapes"
    (hints,) = list(shapes_dir.glob("*.json"))
    assert {(e["function"], e["dims"].get("b"), e["dims"].get("t")) for e in json.loads(hints.read_text())} == {
        ("prefill", 2, 16), ("decode", 2, None)}

    second = runtime.load(tiny.path, tiny.weights)  # as a new process would: same cache directory
    assert _submitted(second) == {("prefill", 2, 16), ("decode", 2, None)}  # started during load
    assert second.generate(PROMPTS[:2], 6) == want

    hints.write_text("{not json")  # a damaged record is ignored, then rewritten by use
    third = runtime.load(tiny.path, tiny.weights)
    assert _submitted(third) == set()
    assert third.generate(PROMPTS[:1], 3) == [want[0][:3]]
    assert json.loads(hints.read_text()) == [  # most recent first
        {"function": "decode", "dims": {"b": 1}}, {"function": "prefill", "dims": {"b": 1, "t": 16}}]


def test_prepare_compiles_ahead_and_changes_nothing(tiny):
    model = runtime.load(tiny.path, tiny.weights, prepare=[(3, 20)], use_compile_cache=False)
    assert _submitted(model) == {("prefill", 4, 32), ("decode", 4, None)}  # bucketed
    assert model.generate(PROMPTS, 5) == tiny.model.generate(PROMPTS, 5)
    assert {p["state"] for p in model.programs()} == {"ready"}
    model.prepare(1, 1)
    assert ("prefill", 1, 16) in _submitted(model)


def test_each_compile_hands_its_freed_heap_back(tiny, monkeypatch):
    """Compiling frees most of what it allocated; those pages go back to the OS once per
    program (runtime.engine.memory), not per call."""
    import runtime.engine.programs as programs
    from runtime.engine.memory import release_freed_memory
    from runtime.engine.programs import solve_dims

    model = runtime.load(tiny.path, tiny.weights, use_compile_cache=False)
    here = threading.get_ident()
    calls = []  # from this thread only: other tests' workers may still be compiling
    monkeypatch.setattr(programs, "release_freed_memory",
                        lambda: calls.append(threading.get_ident() == here) or release_freed_memory())
    dims = solve_dims(model.manifest.functions["prefill"], {"tokens": (2, 16)})
    program = model._programs.get("prefill", dims)  # never prepared: compiled on this thread
    assert calls.count(True) == 1
    assert model._programs.get("prefill", dims) is program
    assert calls.count(True) == 1


@pytest.mark.parametrize("size", [(0, 4), (1, 0), (9, 4), (1, 65), (1.5, 4), (True, 4)])
def test_prepare_refuses_sizes_outside_the_limits(tiny, size):
    with pytest.raises(RequestError, match="prepare: "):
        tiny.model.prepare(*size)
    with pytest.raises(RequestError, match="prepare: "):
        runtime.load(tiny.path, tiny.weights, prepare=[size])


def _programs(tiny, compile_program) -> Programs:
    return Programs(read_manifest(tiny.path).functions, lambda name: object(), compile_program=compile_program)


def test_a_failed_compile_is_raised_to_the_caller_and_retried(tiny):
    broken = [True]  # every compile fails, on whichever thread runs it, until this flips

    def flaky(name, dims):
        if broken[0]:
            raise RuntimeError("compiler fell over")
        return f"{name}-{dims['b']}"

    programs = _programs(tiny, flaky)
    programs.prepare("prefill", {"b": 1, "t": 16})  # fails in the worker, or here
    with pytest.raises(RuntimeError, match="compiler fell over"):
        programs.get("prefill", {"b": 1, "t": 16})
    with pytest.raises(RuntimeError, match="compiler fell over"):
        programs.get("decode", {"b": 1})
    assert programs.status() == []  # failures are not remembered
    broken[0] = False  # the next request compiles again
    assert programs.get("prefill", {"b": 1, "t": 16}) == "prefill-1"
    assert programs.get("decode", {"b": 1}) == "decode-1"


def test_a_caller_compiles_queued_work_itself_while_the_worker_is_busy(tiny):
    started, release, where = threading.Event(), threading.Event(), {}

    def fake(name, dims):
        where[name, dims["b"]] = threading.get_ident()
        if name == "prefill":
            started.set()
            if not release.wait(60):
                raise TimeoutError("never released")
        return f"{name}-{dims['b']}"

    programs = _programs(tiny, fake)
    programs.prepare("prefill", {"b": 1, "t": 16})
    programs.prepare("decode", {"b": 1})
    programs.prepare("decode", {"b": 2})
    assert started.wait(60)  # the worker is inside prefill
    assert programs.get("decode", {"b": 2}) == "decode-2"  # still queued: taken out of turn, here
    assert where["decode", 2] == threading.get_ident()
    states = {(p["function"], p["dims"]["b"]): p["state"] for p in programs.status()}
    assert states == {("prefill", 1): "compiling", ("decode", 1): "queued", ("decode", 2): "ready"}
    release.set()
    assert programs.get("prefill", {"b": 1, "t": 16}) == "prefill-1"
    assert programs.get("decode", {"b": 1}) == "decode-1"
    assert where["prefill", 1] != threading.get_ident()  # the worker's


def test_a_new_request_size_queues_decode_before_prefill_is_compiled(tiny, monkeypatch):
    model = runtime.load(tiny.path, tiny.weights, use_compile_cache=False)
    seen = []
    real = compile_cache.compile_lowered

    def spy(lowered, warn=lambda m: None):
        seen.append({(p["function"], p["dims"]["b"]) for p in model.programs()})
        return real(lowered, warn)

    monkeypatch.setattr(compile_cache, "compile_lowered", spy)
    assert model.generate(PROMPTS[:1] * 5, 2) == tiny.model.generate(PROMPTS[:1] * 5, 2)  # batch bucket 8
    assert seen and {("prefill", 8), ("decode", 8)} <= seen[0]  # both asked for before the first compile


def test_an_exiting_process_does_not_wait_for_queued_compiles(tiny, tmp_path):
    code = """if True:
        import sys
        import runtime
        from runtime.engine import compile_cache
        real = compile_cache.compile_lowered
        def logged(lowered, warn):
            with open(sys.argv[3], "a") as f:
                f.write("compiled\\n")
            return real(lowered, warn)
        compile_cache.compile_lowered = logged
        runtime.load(sys.argv[1], sys.argv[2], use_compile_cache=False,
                     prepare=[(b, t) for b in (1, 2, 4, 8) for t in (16, 32, 64)])
        """  # 16 programs queued (12 prefill, 4 decode), then the script ends
    log = tmp_path / "compiled.txt"
    r = run_python(code, tiny.path, tiny.weights, log, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    compiled = log.read_text().split() if log.exists() else []
    assert len(compiled) <= 2, compiled  # the one in flight at exit (and at most one more)
