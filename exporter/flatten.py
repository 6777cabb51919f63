"""Flatten an exported module: private functions inlined, repeated shape arithmetic folded.

jax lowers every nested jit (jnp.pad, tril, where, ...) and every symbolic-shape expression
(`(t + 127) // 128` through a `divmod` function) to a private function and a call. Each
process that compiles the module for concrete shapes first runs shape refinement over it,
whose MLIR inliner and verifier scale with the number of calls and ops: for 130m prefill,
1,294 calls in 14,600 lines cost 0.46 s of every start. Here, once at export, every call is
inlined and the module canonicalized and CSE'd (the thousand copies of the same divmod on
`t` fold to one): 5,300 lines, refinement 0.08 s, same results bit for bit.

This uses jaxlib's own MLIR bindings (`inlined_func_call`, the function jax itself inlines
with, and the portable-artifact serializer), which are not public API: when they are missing
or anything fails, the module is kept as jax exported it, with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax

_PIPELINE = "builtin.module(canonicalize,cse,canonicalize,cse)"


def flatten_exported(exported: jax.export.Exported) -> jax.export.Exported:
    """`exported` with its module flattened (or unchanged, with a warning, when that fails)."""
    try:
        module_bytes = flatten_module(exported.mlir_module_serialized)
    except Exception as e:  # noqa: BLE001 - private jaxlib API: keep the module as exported
        warnings.warn(f"exported module left unflattened (slower start-up, same results): "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return exported
    return dataclasses.replace(exported, mlir_module_serialized=module_bytes)


def flatten_module(serialized: bytes) -> bytes:
    """A StableHLO portable artifact with every func.call inlined into `main`, canonicalized."""
    from jax._src.export._export import _module_to_bytecode
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax, jax_mlir_ext
    from jaxlib.mlir import ir, passmanager

    with mlir.make_ir_context():
        module = _jax.mlir.deserialize_portable_artifact(serialized)
        funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op
                 for op in module.body.operations if op.operation.name == "func.func"}
        main_type = str(funcs["main"].attributes["function_type"])
        while calls := _calls(module):  # callees' bodies hold calls too: until none are left
            for call in calls:
                callee = funcs[ir.FlatSymbolRefAttr(call.attributes["callee"]).value]
                with ir.InsertionPoint(call), call.location:
                    results = jax_mlir_ext.inlined_func_call(callee.operation, list(call.operands))
                for old, new in zip(call.results, results):
                    old.replace_all_uses_with(new)
                call.erase()
        kept = _referenced(module)  # e.g. the chlo.top_k composite's decomposition: not a call
        for name, op in funcs.items():
            if name != "main" and name not in kept:
                op.operation.erase()
        passmanager.PassManager.parse(_PIPELINE).run(module.operation)
        module.operation.verify()
        if str(funcs["main"].attributes["function_type"]) != main_type:
            raise RuntimeError("flattening changed main's signature")
        return _module_to_bytecode(module)


def _referenced(module) -> set[str]:
    """Names of functions that an op's attribute (not a func.call) refers to."""
    from jaxlib.mlir import ir

    names: set[str] = set()

    def visit(op):
        attrs = op.attributes
        for key in list(attrs):  # e.g. a composite op's `decomposition`
            value = attrs[key]
            if isinstance(value, ir.FlatSymbolRefAttr):
                names.add(value.value)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return names


def _calls(module) -> list:
    from jaxlib.mlir import ir

    found = []

    def visit(op):
        if op.name == "func.call":
            found.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return found
