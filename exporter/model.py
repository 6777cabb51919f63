"""Mamba-2 language model in flax.nnx.

Parameter paths equal HF transformers' checkpoint names (`backbone.layers.0.mixer.in_proj.weight`)
and keep PyTorch's (out, in) layout, contracted as `h @ W.T`: weights load with no renaming or
transposing, and each decode step streams every weight once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from exporter.config import Mamba2Config
from exporter.numerics import Numerics, reference
from exporter.ssd import ssd_chunked, ssd_step
from exporter.state import conv_key, empty_state, ssm_key

F32 = jnp.float32


def _zeros(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


def matvec(x, w, out_dtype=None, precision=None):
    """x [b, i] @ w[o, i].T -> [b, o] for small b (decode), streaming w once.

    XLA CPU's GEMM is slow for 1 < b <= 8 (it re-reads w per row); a broadcast multiply
    reduced over i into an [o, b] output reads each weight row once for all rows. At b = 1
    the plain dot is best. `b` may be symbolic: the branch is resolved when the artifact is
    compiled for a concrete batch.
    """
    x = x.astype(w.dtype)

    def dot(_):
        return jnp.einsum("bi,oi->bo", x, w, preferred_element_type=out_dtype, precision=precision)

    def rows(_):
        acc = jnp.float32 if out_dtype is None else out_dtype
        y = jnp.sum(w[:, None, :].astype(acc) * x[None, :, :].astype(acc), axis=-1)  # [o, b]
        return y.T.astype(out_dtype or w.dtype)

    return jax.lax.cond(jnp.asarray(x.shape[0]) == 1, dot, rows, None)


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias); weight [out, in] as in PyTorch."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, numerics: Numerics):
        self.weight = _zeros((d_out, d_in), dtype)
        self.bias = _zeros((d_out,), dtype) if bias else None
        self.rowwise_decode = numerics.decode_matvec == "rowwise"
        self.precision = numerics.precision("matmul")

    def __call__(self, x):
        if self.rowwise_decode and x.ndim == 2:
            y = matvec(x, self.weight[...])
        else:
            y = jnp.einsum("...i,oi->...o", x.astype(self.weight.dtype), self.weight[...],
                           precision=self.precision)
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    """RMS norm computed in float32; with a gate, x * silu(gate) is normalised per group."""

    def __init__(self, size: int, eps: float, dtype, groups: int = 1):
        self.weight = _zeros((size,), dtype)
        self.eps = eps
        self.groups = groups

    def __call__(self, x, gate=None):
        x = x.astype(F32)
        if gate is not None:
            x = x * jax.nn.silu(gate.astype(F32))
        grouped = x.reshape(*x.shape[:-1], self.groups, -1)  # [..., g, size/g]
        var = jnp.mean(grouped * grouped, axis=-1, keepdims=True)
        x = (grouped * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return x * self.weight[...].astype(F32)


class Conv1d(nnx.Module):
    """Depthwise causal conv; weight [channels, 1, kernel] as in PyTorch."""

    def __init__(self, channels: int, kernel: int, bias: bool, dtype):
        self.weight = _zeros((channels, 1, kernel), dtype)
        self.bias = _zeros((channels,), dtype) if bias else None

    def taps(self):
        return self.weight[...][:, 0, :].astype(F32).T  # [kernel, channels]

    def add_bias(self, y):
        return y if self.bias is None else y + self.bias[...].astype(F32)


class Mixer(nnx.Module):
    """The Mamba-2 mixer: in_proj -> causal conv -> SSD -> gated norm -> out_proj."""

    def __init__(self, cfg: Mamba2Config, dtype, numerics: Numerics):
        self.cfg = cfg
        self.numerics = numerics
        self.in_proj = Linear(cfg.hidden_size, cfg.in_proj_size, cfg.use_bias, dtype, numerics)
        self.conv1d = Conv1d(cfg.conv_dim, cfg.conv_kernel, cfg.use_conv_bias, dtype)
        self.dt_bias = _zeros((cfg.num_heads,), dtype)
        self.A_log = _zeros((cfg.num_heads,), dtype)
        self.D = _zeros((cfg.num_heads,), dtype)
        self.norm = RMSNorm(cfg.intermediate_size, cfg.layer_norm_epsilon, dtype, groups=cfg.n_groups)
        self.out_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.use_bias, dtype, numerics)

    def _split(self, zxbcdt):
        c = self.cfg
        z = zxbcdt[..., : c.intermediate_size]
        xbc = zxbcdt[..., c.intermediate_size : c.intermediate_size + c.conv_dim]
        dt = zxbcdt[..., c.intermediate_size + c.conv_dim :]
        return z, xbc, dt

    def _ssm_inputs(self, xbc, dt):
        """Split the conv output into x [.., h, p], B, C [.., g, n]; dt through softplus and limits."""
        c = self.cfg
        lead = xbc.shape[:-1]
        x = xbc[..., : c.intermediate_size].reshape(*lead, c.num_heads, c.head_dim)
        B = xbc[..., c.intermediate_size : c.intermediate_size + c.n_groups * c.state_size]
        C = xbc[..., c.intermediate_size + c.n_groups * c.state_size :]
        B = B.reshape(*lead, c.n_groups, c.state_size)
        C = C.reshape(*lead, c.n_groups, c.state_size)
        dt = jax.nn.softplus(dt.astype(F32) + self.dt_bias[...].astype(F32))
        lo, hi = c.time_step_limit
        if lo > 0.0 or hi < float("inf"):
            dt = jnp.clip(dt, lo, hi)
        A = -jnp.exp(self.A_log[...].astype(F32))
        return x, B, C, dt, A

    def _output(self, y, x, z):
        """D skip, gated norm, out_proj. y, x: [..., h, p]; z: [..., intermediate]."""
        y = y + x * self.D[...].astype(F32)[:, None]
        y = self.norm(y.reshape(*y.shape[:-2], -1), gate=z)
        return self.out_proj(y)

    def __call__(self, h, valid, lengths, conv_state, ssm_state):
        """Prefill continuing from a state. h [b, t, d]; valid [b, t] bool; lengths [b];
        conv_state [b, K-1, ch] (the conv inputs before position 0); ssm_state [b, h, p, n].
        Returns (out [b, t, d], conv_state, ssm_state) after each row's own valid tokens; a row
        with length 0 gets its incoming state back."""
        K = self.cfg.conv_kernel
        z, xbc, dt = self._split(self.in_proj(h))
        xbc = jnp.where(valid[..., None], xbc.astype(F32), 0.0)  # [b, t, ch]: padding feeds nothing
        b, t, ch = xbc.shape
        padded = jnp.concatenate([conv_state.astype(F32), xbc], axis=1)  # [b, K-1+t, ch]: the window continues
        taps = self.conv1d.taps()  # [K, ch]
        conv = sum(padded[:, k : k + t] * taps[k] for k in range(K))
        conv = jax.nn.silu(self.conv1d.add_bias(conv))  # [b, t, ch]
        # Each row's conv window ends at its own length: padded[len : len + K - 1].
        idx = lengths[:, None] + jnp.arange(K - 1)[None, :]  # [b, K-1]
        conv_state = jnp.take_along_axis(padded, idx[:, :, None], axis=1)  # [b, K-1, ch]

        x, B, C, dt, A = self._ssm_inputs(conv, dt)
        dt = jnp.where(valid[..., None], dt, 0.0)  # padded steps leave the state untouched
        x = jnp.where(valid[..., None, None], x, 0.0)  # and add nothing, even from non-finite values
        nm = self.numerics
        y, ssm_state = ssd_chunked(x, dt, A, B, C, nm.chunk_size, ssm_state, nm.segment_sum,
                                   nm.precision("state"), nm.precision("intra"))
        return self._output(y, x, z), conv_state.astype(self.conv1d.weight.dtype), ssm_state

    def step(self, h, conv_state, ssm_state, active):
        """One token. h [b, d]; conv_state [b, K-1, ch]; ssm_state [b, h, p, n]; active [b] bool.
        Inactive rows are frozen: dt = 0 returns their SSM state as it was (no extra pass over
        it) and their conv window is kept."""
        z, xbc, dt = self._split(self.in_proj(h))
        window = jnp.concatenate([conv_state.astype(F32), xbc.astype(F32)[:, None]], axis=1)  # [b, K, ch]
        # The K taps summed one by one: an einsum becomes one tiny dot per channel, and a
        # multiply + reduce a slow reduction fusion on XLA CPU; this is one elementwise fusion.
        taps = self.conv1d.taps()  # [K, ch]
        conv = sum(window[:, k] * taps[k] for k in range(taps.shape[0]))  # [b, ch]
        conv = jax.nn.silu(self.conv1d.add_bias(conv))
        x, B, C, dt, A = self._ssm_inputs(conv, dt)
        dt = jnp.where(active[:, None], dt, 0.0)  # [b, h]
        y, ssm_state = ssd_step(ssm_state, x, dt, A, B, C, self.numerics.precision("state"))
        conv_state = jnp.where(active[:, None, None], window[:, 1:].astype(conv_state.dtype), conv_state)
        return self._output(y, x, z), conv_state, ssm_state


class Block(nnx.Module):
    """Pre-norm residual block around a mixer; the residual stream stays float32."""

    def __init__(self, cfg: Mamba2Config, dtype, numerics: Numerics):
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.mixer = Mixer(cfg, dtype, numerics)
        self.dtype = dtype

    def __call__(self, resid, valid, lengths, conv, ssm):
        out, conv, ssm = self.mixer(self.norm(resid).astype(self.dtype), valid, lengths, conv, ssm)
        return resid + out.astype(F32), conv, ssm

    def step(self, resid, conv, ssm, active):
        out, conv, ssm = self.mixer.step(self.norm(resid).astype(self.dtype), conv, ssm, active)
        return resid + out.astype(F32), conv, ssm


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype):
        self.weight = _zeros((vocab, dim), dtype)

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


class Backbone(nnx.Module):
    def __init__(self, cfg: Mamba2Config, dtype, numerics: Numerics):
        self.embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List([Block(cfg, dtype, numerics) for _ in range(cfg.num_hidden_layers)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)


class Mamba2LM(nnx.Module):
    """Mamba-2 causal LM over a state dict (exporter.state): prefill from a state (chunked SSD),
    an O(1) decode step with frozen rows, and a full forward for tests.

    The decode loop (exporter.decode_loop) uses prefill, loop_carry, state_dict and step only."""

    def __init__(self, cfg: Mamba2Config, dtype=F32, numerics: Numerics | None = None):
        """numerics: per-platform kernel choices (exporter.numerics); default: the reference."""
        self.cfg = cfg
        self.dtype = dtype
        self.numerics = numerics or reference(cfg.chunk_size)
        self.backbone = Backbone(cfg, dtype, self.numerics)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, self.numerics))

    def logits(self, resid):
        """float32 logits from the residual stream [..., d]."""
        h = self.backbone.norm_f(resid).astype(self.dtype)
        w = self.backbone.embeddings.weight if self.lm_head is None else self.lm_head.weight
        precision = self.numerics.precision("matmul")
        if self.numerics.decode_matvec == "rowwise" and h.ndim == 2:
            return matvec(h, w[...], out_dtype=F32, precision=precision)
        return jnp.einsum("...d,vd->...v", h, w[...], preferred_element_type=F32, precision=precision)

    def _run_layers(self, state, tokens, lengths):
        """state dict; tokens [b, t]; lengths [b]. Returns residual [b, t, d], per-layer residuals,
        the state after each row's valid tokens."""
        t = tokens.shape[1]
        valid = jnp.arange(t)[None, :] < lengths[:, None]  # [b, t]
        tokens = jnp.where(valid, tokens, 0)  # padding never reaches the embedding (ids may be out of range)
        resid = self.backbone.embeddings(tokens).astype(F32)  # [b, t, d]
        hidden, out = [], {}
        for i, layer in enumerate(self.backbone.layers):
            resid, out[conv_key(i)], out[ssm_key(i)] = layer(
                resid, valid, lengths, state[conv_key(i)], state[ssm_key(i)])
            hidden.append(resid)
        return resid, hidden, out

    def prefill(self, state, tokens, lengths):
        """state (zeros: fresh rows); tokens [b, t] right-padded; lengths [b] in [0, t]. Returns
        (logits [b, V] at each row's last token, the state after its tokens). A row of length 0
        keeps its state (its logits are meaningless)."""
        resid, _, state = self._run_layers(state, tokens, lengths)
        last = jnp.clip(lengths - 1, 0, None)
        resid_last = jnp.take_along_axis(resid, last[:, None, None], axis=1)[:, 0]  # [b, d]
        return self.logits(resid_last), state

    def forward(self, tokens):
        """All-position logits [b, t, V] and each layer's output residual (tests and verify)."""
        b, t = tokens.shape
        state = empty_state(self.cfg, b, self.dtype)
        resid, hidden, state = self._run_layers(state, tokens, jnp.full((b,), t, jnp.int32))
        return self.logits(resid), hidden, state

    # -- the decode loop's protocol --------------------------------------------------------------
    def loop_carry(self, state):
        """The state as the loop carries it: already one buffer per layer, updated in place."""
        return dict(state)

    def state_dict(self, carry):
        return dict(carry)

    def step(self, tokens, carry, active):
        """tokens [b], carry from loop_carry, active [b] bool -> (logits [b, V], carry): one O(1)
        recurrent step through every layer; inactive rows keep their state."""
        resid = self.backbone.embeddings(tokens).astype(F32)  # [b, d]
        carry = dict(carry)
        for i, layer in enumerate(self.backbone.layers):
            resid, carry[conv_key(i)], carry[ssm_key(i)] = layer.step(
                resid, carry[conv_key(i)], carry[ssm_key(i)], active)
        return self.logits(resid), carry
