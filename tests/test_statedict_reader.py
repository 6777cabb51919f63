"""The restricted torch.save reader: real state dicts read; every malicious or malformed file refused.

Each payload is first shown to be live (the standard library's unpickler runs it and the marker
file appears); then the reader refuses the same bytes with one line naming what it found, and
the marker never appears. Hand-assembled pickles cover what torch.save never writes: other
opcodes, globals nested inside an otherwise valid state dict, views outside their storage.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from exporter import torch_zip
from exporter.torch_zip import TorchZipCheckpoint
from runtime.errors import WeightsError
from test_errors_cli import cli, error_line

# ---------------------------------------------------------------- a tiny pickle assembler


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def text(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def num(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


EMPTY_HOOKS = glob("collections", "OrderedDict") + b")R"


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    return tup(text("storage"), glob("torch", kind), text(key), text("cpu"), num(numel)) + b"Q"


def tensor(key="0", numel=4, offset=0, shape=(2, 2), stride=(2, 1), hooks=EMPTY_HOOKS, kind="FloatStorage") -> bytes:
    args = tup(storage(key, numel, kind), num(offset), tup(*map(num, shape)), tup(*map(num, stride)), b"\x89", hooks)
    return glob("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def state_dict(entries: dict[str, bytes], build: bytes = b"") -> bytes:
    body = b"".join(text(k) + v for k, v in entries.items())
    return b"\x80\x02" + glob("collections", "OrderedDict") + b")R(" + body + b"u" + build + b"."


def archive(path: Path, pkl: bytes, records: dict[str, bytes] | None = None, prefix: str = "archive",
            byteorder: bytes = b"little", extra: dict[str, bytes] | None = None) -> Path:
    """A torch.save-style zip: <prefix>/data.pkl, byteorder, data/<key> records (stored)."""
    records = {"0": np.arange(4, dtype=np.float32).tobytes()} if records is None else records
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"{prefix}/data/{key}", data)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
        z.writestr(f"{prefix}/version", b"3\n")
    return path


def test_assembled_state_dict_reads(tmp_path):
    """The positive control for everything below: the assembler writes what torch.save writes."""
    pkl = state_dict({"w": tensor(), "t": tensor(shape=(2, 2), stride=(1, 2)), "row": tensor(offset=2, shape=(2,), stride=(1,))},
                     build=b"}" + text("_metadata") + b"}s" + b"b")
    ck = TorchZipCheckpoint(archive(tmp_path / "ok.bin", pkl))
    np.testing.assert_array_equal(ck.read("w"), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(ck.read("t"), [[0, 2], [1, 3]])
    np.testing.assert_array_equal(ck.read("row"), [2, 3])


def test_torch_save_files_read_exactly(tmp_path):
    """Real torch.save output: dtypes, shared storages, transposed and offset views, Parameters,
    pickle protocol 4 (frames, memoize)."""
    import torch

    w = torch.randn(5, 3)
    sd = collections.OrderedDict(
        a=w, tied=w, t=torch.randn(3, 4).t(), half=torch.randn(6).half(), bf=torch.randn(2, 3).bfloat16(),
        p=torch.nn.Parameter(torch.randn(2)), view=torch.randn(10)[3:7], big=torch.randn(70000), empty=torch.zeros(0, 4),
    )
    sd._metadata = {"": {"version": 1}}
    for protocol in (2, 4):
        torch.save(sd, tmp_path / f"p{protocol}.bin", pickle_protocol=protocol)
        ck = TorchZipCheckpoint(tmp_path / f"p{protocol}.bin")
        assert ck.names() == list(sd)
        for name, t in sd.items():
            got = ck.read(name)
            assert got.shape == tuple(t.shape) and ck.shape(name) == tuple(t.shape)
            np.testing.assert_array_equal(got.astype(np.float32), t.detach().float().numpy())
        assert ck.dtype_name("bf") == "bfloat16" and ck.dtype("half") == np.float16
        assert not ck.read("a").flags.writeable


# ---------------------------------------------------------------- payloads


class Reduce:
    """Pickles as a call of fn(*args): what an attacker's object does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    import builtins

    m = str(marker)
    return {
        "os.system": Reduce(os.system, f"touch {m}"),
        "subprocess": Reduce(subprocess.call, ["touch", m]),
        "eval": Reduce(builtins.eval, f"open({m!r}, 'w').close()"),
        "exec": Reduce(builtins.exec, f"open({m!r}, 'w').close()"),
        "builtins.open": Reduce(builtins.open, m, "w"),
    }


PAYLOADS = list(_payloads(Path("x")))


def _payload_bytes(name: str, marker: Path, wrap) -> bytes:
    return pickle.dumps(wrap(_payloads(marker)[name]), protocol=2)


WRAPS = {
    "whole": lambda p: p,
    "as-a-value": lambda p: collections.OrderedDict(w=p),
    "in-a-list": lambda p: {"w": [1, p]},
}


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_are_refused_and_never_run(payload, wrap, tmp_path):
    live_marker = tmp_path / "LIVE"
    pickle.loads(_payload_bytes(payload, live_marker, WRAPS[wrap]))
    assert live_marker.exists(), "the payload is not live: the test would prove nothing"
    marker = tmp_path / "MARKER"
    path = archive(tmp_path / "evil.bin", _payload_bytes(payload, marker, WRAPS[wrap]))
    with pytest.raises(WeightsError) as e:
        TorchZipCheckpoint(path)
    message = str(e.value)
    assert "refusing to read it" in message and "which a state dict never needs" in message
    assert "nothing in it was run" in message and "\n" not in message
    assert not marker.exists()


def test_legacy_formats_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    raw = tmp_path / "legacy.bin"
    raw.write_bytes(pickle.dumps({"w": Reduce(os.system, f"touch {marker}")}, protocol=2))
    with pytest.raises(WeightsError, match=r"legacy \(PyTorch < 1.6\) torch.save format"):
        TorchZipCheckpoint(raw)
    tar = tmp_path / "tar.bin"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("pickle")
        info.size = raw.stat().st_size
        t.addfile(info, io.BytesIO(raw.read_bytes()))
    with pytest.raises(WeightsError, match="legacy tar format"):
        TorchZipCheckpoint(tar)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="not a torch.save file"):
        TorchZipCheckpoint(junk)
    assert not marker.exists()


# ---------------------------------------------------------------- hand-assembled tricks

SYSTEM = glob("posix", "system") + tup(text("touch MARKER")) + b"R"

TRICKS = {
    # globals nested inside an otherwise valid state dict
    "hook-payload": (state_dict({"w": tensor(hooks=SYSTEM)}), "references posix.system"),
    "storage-type-payload": (state_dict({"w": tensor(kind="system")}), "references torch.system"),
    "build-payload": (state_dict({"w": tensor()}, build=b"}" + text("x") + SYSTEM + b"sb"), "references posix.system"),
    "stack-global": (b"\x80\x04" + text("builtins") + text("eval") + b"\x93" + tup(text("1")) + b"R.",
                     "references builtins.eval"),
    "getattr-chain": (b"\x80\x02" + glob("builtins", "getattr") + tup(glob("builtins", "__import__") + tup(text("os")) + b"R",
                                                                     text("system")) + b"R.", "references builtins.getattr"),
    "copyreg": (b"\x80\x02" + glob("copyreg", "_reconstructor") + tup() + b"R.", "references copyreg._reconstructor"),
    # allowed names used in ways a state dict never uses them
    "call-a-storage-type": (b"\x80\x02" + glob("torch", "FloatStorage") + tup(num(4)) + b"R.", "calls a StorageType"),
    "call-a-tensor": (b"\x80\x02" + tensor() + b")R.", "calls a TensorRef"),
    "build-on-tensor": (state_dict({"w": tensor() + b"}b"}), "sets the state of a TensorRef"),
    "ordered-dict-args": (b"\x80\x02" + glob("collections", "OrderedDict") + tup(text("x")) + b"R.",
                          "called with arguments"),
    "hooks-not-empty": (state_dict({"w": tensor(hooks=b"}" + text("h") + num(1) + b"s")}), "backward hooks"),
    "rebuild-wrong-arity": (b"\x80\x02" + glob("torch._utils", "_rebuild_tensor_v2") + tup(num(1)) + b"R.", "with 1 arguments"),
    "rebuild-over-int": (b"\x80\x02" + glob("torch._utils", "_rebuild_tensor_v2")
                         + tup(num(1), num(0), tup(), tup(), b"\x89", b"}") + b"R.", "built over a int"),
    # other opcodes
    "inst": (b"\x80\x02(icollections\nOrderedDict\n.", "opcode INST"),
    "obj": (b"\x80\x02(" + glob("collections", "OrderedDict") + b"o.", "opcode OBJ"),
    "newobj": (b"\x80\x02" + glob("collections", "OrderedDict") + b")\x81.", "opcode NEWOBJ"),
    "ext1": (b"\x80\x02\x82\x01.", "opcode EXT1"),
    "text-persid": (b"\x80\x02P0\n.", "opcode PERSID"),
    "pop": (b"\x80\x02N0}.", "opcode POP"),
    "unknown-byte": (b"\x80\x02\xff.", "byte b'\\xff'"),
    # structure
    "not-a-dict": (b"\x80\x02" + tup(tensor()) + b".", "is a tuple, not a state dict"),
    "non-tensor-entry": (state_dict({"w": tensor(), "step": num(3)}), "'step' is a int, not a tensor"),
    "bad-persid": (b"\x80\x02" + tup(text("module"), text("os")) + b"Q.", "not a storage record"),
    "persid-numel-str": (b"\x80\x02" + tup(text("storage"), glob("torch", "FloatStorage"), text("0"), text("cpu"),
                                           text("4")) + b"Q.", "malformed storage record"),
    "memo-get-unset": (b"\x80\x02h\x07.", "memo entry 7"),
    "truncated": (state_dict({"w": tensor()})[:40], "truncated"),
    "empty-stack": (b"\x80\x02t.", "no MARK"),
    "leftover-stack": (b"\x80\x02NN.", "leaves objects on the stack"),
    "huge-long": (b"\x80\x02\x8a\x40" + b"\x01" * 64 + b".", "more than 128 bits"),
    "list-key": (b"\x80\x02}]Ns.", "uses a list as a dict key"),
    # views outside their storage
    "past-the-end": (state_dict({"w": tensor(shape=(5,), stride=(1,))}), "does not fit its storage of 4"),
    "offset-past-end": (state_dict({"w": tensor(offset=3, shape=(2,), stride=(1,))}), "does not fit"),
    "huge-stride": (state_dict({"w": tensor(shape=(2, 2), stride=(1 << 30, 1))}), "does not fit"),
    "overlapping-blowup": (state_dict({"w": tensor(shape=(100, 100), stride=(0, 0))}), "does not fit"),
    "negative-stride": (state_dict({"w": tensor(shape=(2,), stride=(-1,))}), "not a tuple of non-negative integers"),
    "negative-offset": (state_dict({"w": tensor(offset=-1, shape=(2,), stride=(1,))}), "storage offset is -1"),
    "rank-mismatch": (state_dict({"w": tensor(shape=(2, 2), stride=(1,))}), "but stride"),
    # storage records that do not match the archive
    "record-size": (state_dict({"w": tensor(numel=8, shape=(8,), stride=(1,))}), "holds 16 bytes, not the 8 x 4"),
    "missing-record": (state_dict({"w": tensor(key="9")}), "has no data/9 member"),
    "path-key": (state_dict({"w": tensor(key="../0")}), "has no data/../0 member"),
    "two-descriptions": (state_dict({"a": tensor(), "b": tensor(kind="HalfStorage", numel=8, shape=(8,), stride=(1,))}),
                         "described twice"),
}


@pytest.mark.parametrize("case", list(TRICKS))
def test_tricks_are_refused(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a `touch MARKER` that ran would land here
    pkl, needle = TRICKS[case]
    with pytest.raises(WeightsError) as e:
        TorchZipCheckpoint(archive(tmp_path / "x.bin", pkl))
    message = str(e.value)
    assert needle in message and "refusing to read it" in message and "\n" not in message, message
    assert not (tmp_path / "MARKER").exists()


ARCHIVES = {
    "two-data-pkl": (dict(extra={"other/data.pkl": state_dict({})}), "no single <name>/data.pkl"),
    "no-data-pkl": (dict(prefix="a/b"), "no single <name>/data.pkl"),
    "outside-prefix": (dict(extra={"evil.txt": b"x"}), "members outside its torch.save directory"),
    "big-endian": (dict(byteorder=b"big"), "stored big-endian"),
    "duplicate-member": (dict(extra={"archive/data/0": b"\x00" * 16}), "lists a member twice"),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_archive_tricks_are_refused(case, tmp_path):
    kw, needle = ARCHIVES[case]
    with pytest.warns(UserWarning) if case == "duplicate-member" else contextlib.nullcontext():
        path = archive(tmp_path / "x.bin", state_dict({"w": tensor()}), **kw)
    with pytest.raises(WeightsError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        TorchZipCheckpoint(path)


def test_oversized_data_pkl_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_zip, "MAX_PKL_BYTES", 64)
    with pytest.raises(WeightsError, match="far more than a state dict needs"):
        TorchZipCheckpoint(archive(tmp_path / "x.bin", state_dict({"w": tensor()})))


def test_truncated_archive_refused(tmp_path):
    import torch

    torch.save({"w": torch.randn(1000)}, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a torch.save file"):
        TorchZipCheckpoint(tmp_path / "cut.bin")
    # a record whose local header points past the end: the central directory kept, the data cut
    path = archive(tmp_path / "x.bin", state_dict({"w": tensor()}))
    ck = TorchZipCheckpoint(path)
    info = ck._records["data/0"]
    info.header_offset = path.stat().st_size - 10
    with pytest.raises(WeightsError, match="lies past the end of the file: it is truncated"):
        ck.read("w")


def test_compressed_records_read(tmp_path):
    """torch.save stores records uncompressed; a deflated record still reads (one storage at a time)."""
    path = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", state_dict({"w": tensor()}))
        z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(TorchZipCheckpoint(path).read("w"), [[0, 1], [2, 3]])


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("payload", ["os.system", "subprocess"])
def test_cli_refuses_a_malicious_checkpoint_in_one_line(payload, tmp_path, capfd):
    import mamba_ssm_format as ssm

    marker = tmp_path / "MARKER"
    d = tmp_path / "mamba2-130m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ssm.official_config("130m")))
    evil = collections.OrderedDict([("backbone.embedding.weight", _payloads(marker)[payload])])
    archive(d / "pytorch_model.bin", pickle.dumps(evil, protocol=2))
    code, out, err = cli(capfd, "convert-checkpoint", d, tmp_path / "out")
    error_line(code, err, "refusing to read it", "which a state dict never needs", "nothing in it was run")
    assert out == "" and not marker.exists() and not (tmp_path / "out").exists()
