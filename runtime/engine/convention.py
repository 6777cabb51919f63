"""How to call an artifact's two functions: its semantics version (manifest `semantics_version`).

The engine always speaks in version 2's terms (a state in and out of prefill, every decode
control per row); version 1 artifacts are adapted: their prefill starts from a fresh state and
their decode takes one budget, one step counter, one set of sampling settings and one stop list
for the whole batch, so requests that need more are refused with a clear message.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import RequestError

_REEXPORT = "re-export the artifact with this mamba2-aot"


class ConventionV2:
    version = 2
    carries_state = True

    def prefill(self, call, params, state, tokens, lengths):
        return call("prefill", {"tokens": np.shape(tokens)}, params, state, tokens, lengths)

    def decode(self, call, params, state, logits, finished, budget, steps, keys, settings, stop_ids):
        return call("decode", {"finished": np.shape(finished)}, params, state, logits, finished,
                    budget, steps, keys, settings.temperature, settings.top_k, settings.top_p,
                    settings.min_p, stop_ids)

    def check_rows(self, settings, stop_ids, budgets, steps) -> None:
        """Anything goes: every control is per row."""


class ConventionV1:
    """Schema 1 artifacts: prefill(params, tokens, lengths); decode with scalar controls."""

    version = 1
    carries_state = False

    def prefill(self, call, params, state, tokens, lengths):
        if state is not None:
            raise RequestError(f"this artifact cannot continue from a state (semantics 1): {_REEXPORT}")
        return call("prefill", {"tokens": np.shape(tokens)}, params, tokens, lengths)

    def decode(self, call, params, state, logits, finished, budget, steps, keys, settings, stop_ids):
        active = ~np.asarray(finished)
        row = int(np.argmax(active)) if active.any() else 0
        return call("decode", {"finished": np.shape(finished)}, params, state, logits, finished,
                    np.int32(np.max(budget)), np.int32(steps[row]), keys,
                    np.float32(settings.temperature[row]), np.int32(settings.top_k[row]),
                    np.float32(settings.top_p[row]), np.float32(settings.min_p[row]), stop_ids[row])

    def check_rows(self, settings, stop_ids, budgets, steps) -> None:
        """One value per batch: refuse what differs between rows."""
        if not settings.uniform():
            raise RequestError(f"this artifact takes one set of sampling settings per batch (semantics 1): "
                               f"give every row the same, or {_REEXPORT}")
        if len({tuple(r) for r in np.asarray(stop_ids).tolist()}) > 1:
            raise RequestError(f"this artifact takes one stop list per batch (semantics 1): {_REEXPORT}")
        if len(set(budgets)) > 1:
            raise RequestError(f"this artifact takes one max_new_tokens per batch (semantics 1): {_REEXPORT}")


def convention(version: int):
    return ConventionV2() if version == 2 else ConventionV1()
