"""A restricted reader for the pickled `data.pkl` of a torch.save file: it can only build a state dict.

The standard library's unpickler is never used: this module interprets the opcodes itself and
implements only those a state dict needs (containers, strings, numbers, the memo, persistent
ids). Globals are looked up in an allow-list of six names, each mapped to a constructor of this
module that returns plain data (a tensor reference, a dict); nothing is ever imported or
called by name. Any other opcode, global, call or object state is refused with `Refused`,
before anything it names could run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

MAX_DEPTH = 1 << 20  # stack + memo entries: a state dict of 10k tensors uses ~100k


class Refused(Exception):
    """The data is not a plain state dict (one-line reason; nothing it names was run)."""


@dataclasses.dataclass(frozen=True)
class StorageType:
    """A typed storage class named in a persistent id (torch.FloatStorage, ...)."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """One storage record of the archive: `numel` elements of `dtype` under data/<key>."""

    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A strided view of a storage (offset, shape, stride in elements), bounds-checked."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StateDict(dict):
    """What collections.OrderedDict() builds here: a plain dict that accepts BUILD (its _metadata)."""


@dataclasses.dataclass(frozen=True)
class _Constructor:
    name: str
    fn: Callable[..., Any]


def _ordered_dict(*args):
    if args:
        raise Refused("collections.OrderedDict is called with arguments")
    return _StateDict()


def _dims(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        raise Refused(f"a tensor's {what} is {v!r}, not a tuple of non-negative integers")
    return v


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None) -> TensorRef:
    """torch._utils._rebuild_tensor_v2's arguments, checked; the view must lie inside its storage."""
    if not isinstance(storage, StorageRef):
        raise Refused(f"a tensor is built over a {type(storage).__name__}, not a storage record")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise Refused(f"a tensor's storage offset is {offset!r}")
    shape, strides = _dims(size, "size"), _dims(stride, "stride")
    if len(shape) != len(strides) or not isinstance(requires_grad, bool):
        raise Refused(f"a tensor has size {shape} but stride {strides}")
    if hooks or (metadata is not None and metadata != {}):
        raise Refused("a tensor carries backward hooks or extra metadata")
    numel = math.prod(shape)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if numel > storage.numel or last >= storage.numel:
            raise Refused(f"a tensor of shape {list(shape)} (offset {offset}, stride {list(strides)}) does "
                          f"not fit its storage of {storage.numel} elements")
    return TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data, requires_grad, hooks):
    if not isinstance(data, TensorRef) or hooks:
        raise Refused("torch._utils._rebuild_parameter is called on something other than a tensor")
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Constructor("collections.OrderedDict", _ordered_dict),
    ("torch._utils", "_rebuild_tensor_v2"): _Constructor("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Constructor("torch._utils._rebuild_parameter", _rebuild_parameter),
    **{("torch", name): StorageType(name, np.dtype(dt)) for name, dt in _STORAGES.items()},
}

# Opcodes (pickle protocols 2-5) that a state dict uses; every other one is refused by name.
_NAMES = {
    b"\x80": "PROTO", b"\x95": "FRAME", b".": "STOP", b"(": "MARK", b"}": "EMPTY_DICT", b"]": "EMPTY_LIST",
    b")": "EMPTY_TUPLE", b"t": "TUPLE", b"\x85": "TUPLE1", b"\x86": "TUPLE2", b"\x87": "TUPLE3", b"l": "LIST",
    b"d": "DICT", b"a": "APPEND", b"e": "APPENDS", b"s": "SETITEM", b"u": "SETITEMS", b"J": "BININT",
    b"K": "BININT1", b"M": "BININT2", b"\x8a": "LONG1", b"G": "BINFLOAT", b"N": "NONE", b"\x88": "NEWTRUE",
    b"\x89": "NEWFALSE", b"X": "BINUNICODE", b"\x8c": "SHORT_BINUNICODE", b"\x8d": "BINUNICODE8",
    b"q": "BINPUT", b"r": "LONG_BINPUT", b"\x94": "MEMOIZE", b"h": "BINGET", b"j": "LONG_BINGET",
    b"c": "GLOBAL", b"\x93": "STACK_GLOBAL", b"R": "REDUCE", b"b": "BUILD", b"Q": "BINPERSID",
}
# Well-known opcodes this reader refuses, named in the refusal (INST, OBJ, NEWOBJ build objects).
_REFUSED_NAMES = {
    b"i": "INST", b"o": "OBJ", b"\x81": "NEWOBJ", b"\x92": "NEWOBJ_EX", b"P": "PERSID", b"\x82": "EXT1",
    b"\x83": "EXT2", b"\x84": "EXT4", b"0": "POP", b"1": "POP_MARK", b"2": "DUP", b"\x8b": "LONG4",
    b"B": "BINBYTES", b"C": "SHORT_BINBYTES", b"\x8e": "BINBYTES8", b"\x96": "BYTEARRAY8",
    b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER", b"\x8f": "EMPTY_SET", b"\x90": "ADDITEMS",
    b"\x91": "FROZENSET", b"I": "INT", b"L": "LONG", b"F": "FLOAT", b"S": "STRING", b"V": "UNICODE",
    b"T": "BINSTRING", b"U": "SHORT_BINSTRING", b"g": "GET", b"p": "PUT",
}
_GLOBAL_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")


class _Mark:
    pass


_MARK = _Mark()


class _Machine:
    """The opcode interpreter: one pass over `data`, a stack, a memo; STOP returns the top."""

    def __init__(self, data: bytes, load_storage: Callable[[StorageType, str, int], StorageRef]):
        self.data, self.pos = data, 0
        self.stack: list = []
        self.memo: dict[int, Any] = {}
        self.load_storage = load_storage

    # -- reading the byte stream
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Refused("the pickled data is truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise Refused("the pickled data is truncated")
        raw = self.take(end - self.pos + 1)[:-1]
        return raw.decode("ascii", "replace")

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("a string in the pickled data is not UTF-8") from None

    # -- the stack
    def push(self, v) -> None:
        if len(self.stack) >= MAX_DEPTH:
            raise Refused("the pickled data nests too deeply")
        self.stack.append(v)

    def pop(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise Refused("the pickled data pops an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise Refused("the pickled data has no MARK where one is needed")

    def top(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise Refused("the pickled data reads an empty stack")
        return self.stack[-1]

    def put(self, key: int) -> None:
        if len(self.memo) >= MAX_DEPTH and key not in self.memo:
            raise Refused("the pickled data memoizes too many objects")
        self.memo[key] = self.top()

    def get(self, key: int):
        if key not in self.memo:
            raise Refused(f"the pickled data reads memo entry {key}, which was never written")
        self.push(self.memo[key])

    # -- the run
    def run(self):
        while True:
            op = self.take(1)
            name = _NAMES.get(op)
            if name is None:
                what = _REFUSED_NAMES.get(op, f"byte {op!r}")
                raise Refused(f"the pickled data uses opcode {what}, which a state dict never needs")
            if name == "STOP":
                result = self.pop()
                if self.stack:
                    raise Refused("the pickled data leaves objects on the stack")
                return result
            getattr(self, "op_" + name)()

    def op_PROTO(self):
        if self.uint(1) > 5:
            raise Refused("the pickled data uses an unknown protocol")

    def op_FRAME(self):
        self.uint(8)  # frames only group bytes; the data is read whole

    def op_MARK(self):
        self.push(_MARK)

    def op_EMPTY_DICT(self):
        self.push({})

    def op_EMPTY_LIST(self):
        self.push([])

    def op_EMPTY_TUPLE(self):
        self.push(())

    def op_TUPLE(self):
        self.push(tuple(self.pop_mark()))

    def op_TUPLE1(self):
        self.push((self.pop(),))

    def op_TUPLE2(self):
        b, a = self.pop(), self.pop()
        self.push((a, b))

    def op_TUPLE3(self):
        c, b, a = self.pop(), self.pop(), self.pop()
        self.push((a, b, c))

    def op_LIST(self):
        self.push(list(self.pop_mark()))

    def op_DICT(self):
        items = self.pop_mark()
        self.push({})
        self._set_items(items)

    def op_APPEND(self):
        v = self.pop()
        self._list().append(v)

    def op_APPENDS(self):
        items = self.pop_mark()
        self._list().extend(items)

    def _list(self) -> list:
        target = self.top()
        if type(target) is not list:
            raise Refused(f"the pickled data appends to a {type(target).__name__}")
        return target

    def op_SETITEM(self):
        v, k = self.pop(), self.pop()
        self._set_items([k, v])

    def op_SETITEMS(self):
        self._set_items(self.pop_mark())

    def _set_items(self, items: list) -> None:
        target = self.top()
        if not isinstance(target, dict) or len(items) % 2:
            raise Refused(f"the pickled data sets items on a {type(target).__name__}")
        for k, v in zip(items[::2], items[1::2]):
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise Refused(f"the pickled data uses a {type(k).__name__} as a dict key")
            target[k] = v

    def op_BININT(self):
        self.push(struct.unpack("<i", self.take(4))[0])

    def op_BININT1(self):
        self.push(self.uint(1))

    def op_BININT2(self):
        self.push(self.uint(2))

    def op_LONG1(self):
        n = self.uint(1)
        if n > 16:
            raise Refused("the pickled data holds an integer of more than 128 bits")
        self.push(int.from_bytes(self.take(n), "little", signed=True))

    def op_BINFLOAT(self):
        self.push(struct.unpack(">d", self.take(8))[0])

    def op_NONE(self):
        self.push(None)

    def op_NEWTRUE(self):
        self.push(True)

    def op_NEWFALSE(self):
        self.push(False)

    def op_BINUNICODE(self):
        self.push(self.text(self.uint(4)))

    def op_SHORT_BINUNICODE(self):
        self.push(self.text(self.uint(1)))

    def op_BINUNICODE8(self):
        self.push(self.text(self.uint(8)))

    def op_BINPUT(self):
        self.put(self.uint(1))

    def op_LONG_BINPUT(self):
        self.put(self.uint(4))

    def op_MEMOIZE(self):
        self.put(len(self.memo))

    def op_BINGET(self):
        self.get(self.uint(1))

    def op_LONG_BINGET(self):
        self.get(self.uint(4))

    def op_GLOBAL(self):
        module = self.line()
        self._global(module, self.line())

    def op_STACK_GLOBAL(self):
        name, module = self.pop(), self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise Refused("the pickled data names a global with non-strings")
        self._global(module, name)

    def _global(self, module: str, name: str) -> None:
        found = _ALLOWED.get((module, name))
        if found is None:
            shown = f"{module}.{name}" if _GLOBAL_PART.match(module) and _GLOBAL_PART.match(name) else \
                repr(f"{module}.{name}")[:80]
            raise Refused(f"the pickled data references {shown}, which a state dict never needs")
        self.push(found)

    def op_REDUCE(self):
        args, fn = self.pop(), self.pop()
        if not isinstance(fn, _Constructor):
            raise Refused(f"the pickled data calls a {type(fn).__name__}, which a state dict never does")
        if not isinstance(args, tuple):
            raise Refused(f"the pickled data calls {fn.name} with a {type(args).__name__} of arguments")
        try:
            self.push(fn.fn(*args))
        except TypeError:
            raise Refused(f"the pickled data calls {fn.name} with {len(args)} arguments") from None

    def op_BUILD(self):
        state, target = self.pop(), self.top()
        # OrderedDict's state is its instance __dict__ (a state dict's `_metadata`): dropped.
        if not isinstance(target, _StateDict) or not isinstance(state, dict):
            raise Refused(f"the pickled data sets the state of a {type(target).__name__}, "
                          "which a state dict never does")

    def op_BINPERSID(self):
        pid = self.pop()
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"the pickled data has a persistent id {str(pid)[:60]!r} that is not a storage record")
        _, kind, key, location, numel = pid
        if not isinstance(kind, StorageType) or not isinstance(key, str) or not isinstance(location, str) \
                or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise Refused(f"the pickled data has a malformed storage record {str(pid)[:80]!r}")
        self.push(self.load_storage(kind, key, numel))


def read_state_dict(data: bytes, load_storage: Callable[[StorageType, str, int], StorageRef]) -> dict[str, TensorRef]:
    """{name: TensorRef} from data.pkl; `load_storage(type, key, numel)` resolves each storage record
    (it checks the record against the archive; no tensor data is read here). Raises Refused."""
    result = _Machine(data, load_storage).run()
    if not isinstance(result, dict):
        raise Refused(f"the pickled data is a {type(result).__name__}, not a state dict (a dict of tensors)")
    for k, v in result.items():
        if not isinstance(k, str) or not isinstance(v, TensorRef):
            raise Refused(f"state dict entry {str(k)[:60]!r} is a {type(v).__name__}, not a tensor")
    return dict(result)
