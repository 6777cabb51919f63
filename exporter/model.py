"""Mamba-2 language model in flax.nnx.

Parameter paths equal HF transformers' checkpoint names (`backbone.layers.0.mixer.in_proj.weight`)
and keep PyTorch's (out, in) layout, contracted as `h @ W.T`: weights load with no renaming or
transposing, and each decode step streams every weight once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from exporter.cache import Mamba2Cache
from exporter.config import Mamba2Config
from exporter.ssd import ssd_chunked, ssd_step

F32 = jnp.float32


def _zeros(shape, dtype):
    return nnx.Param(jnp.zeros(shape, dtype))


def matvec(x, w, out_dtype=None):
    """x [b, i] @ w[o, i].T -> [b, o] for small b (decode), streaming w once.

    XLA CPU's GEMM is slow for 1 < b <= 8 (it re-reads w per row); a broadcast multiply
    reduced over i into an [o, b] output reads each weight row once for all rows. At b = 1
    the plain dot is best. `b` may be symbolic: the branch is resolved when the artifact is
    compiled for a concrete batch.
    """
    x = x.astype(w.dtype)

    def dot(_):
        return jnp.einsum("bi,oi->bo", x, w, preferred_element_type=out_dtype)

    def rows(_):
        acc = jnp.float32 if out_dtype is None else out_dtype
        y = jnp.sum(w[:, None, :].astype(acc) * x[None, :, :].astype(acc), axis=-1)  # [o, b]
        return y.T.astype(out_dtype or w.dtype)

    return jax.lax.cond(jnp.asarray(x.shape[0]) == 1, dot, rows, None)


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias); weight [out, in] as in PyTorch."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rowwise_decode: bool = False):
        self.weight = _zeros((d_out, d_in), dtype)
        self.bias = _zeros((d_out,), dtype) if bias else None
        self.rowwise_decode = rowwise_decode

    def __call__(self, x):
        if self.rowwise_decode and x.ndim == 2:
            y = matvec(x, self.weight[...])
        else:
            y = jnp.einsum("...i,oi->...o", x.astype(self.weight.dtype), self.weight[...])
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

    def __init__(self, cfg: Mamba2Config, dtype, rowwise: bool = False):
        self.cfg = cfg
        self.in_proj = Linear(cfg.hidden_size, cfg.in_proj_size, cfg.use_bias, dtype, rowwise)
        self.conv1d = Conv1d(cfg.conv_dim, cfg.conv_kernel, cfg.use_conv_bias, dtype)
        self.dt_bias = _zeros((cfg.num_heads,), dtype)
        self.A_log = _zeros((cfg.num_heads,), dtype)
        self.D = _zeros((cfg.num_heads,), dtype)
        self.norm = RMSNorm(cfg.intermediate_size, cfg.layer_norm_epsilon, dtype, groups=cfg.n_groups)
        self.out_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.use_bias, dtype, rowwise)

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

    def __call__(self, h, valid, lengths):
        """Prefill. h [b, t, d]; valid [b, t] bool; lengths [b]. Returns (out [b, t, d], conv, ssm)."""
        K = self.cfg.conv_kernel
        z, xbc, dt = self._split(self.in_proj(h))
        xbc = xbc.astype(F32)
        b, t, ch = xbc.shape
        padded = jnp.pad(xbc, [(0, 0), (K - 1, 0), (0, 0)])  # [b, K-1+t, ch]
        taps = self.conv1d.taps()  # [K, ch]
        conv = sum(padded[:, k : k + t] * taps[k] for k in range(K))
        conv = jax.nn.silu(self.conv1d.add_bias(conv))  # [b, t, ch]
        # Each row's conv window ends at its own length: padded[len : len + K - 1].
        idx = lengths[:, None] + jnp.arange(K - 1)[None, :]  # [b, K-1]
        conv_state = jnp.take_along_axis(padded, idx[:, :, None], axis=1)  # [b, K-1, ch]

        x, B, C, dt, A = self._ssm_inputs(conv, dt)
        dt = jnp.where(valid[..., None], dt, 0.0)  # padded steps leave the state untouched
        y, ssm_state = ssd_chunked(x, dt, A, B, C, self.cfg.chunk_size)
        return self._output(y, x, z), conv_state.astype(self.conv1d.weight.dtype), ssm_state

    def step(self, h, conv_state, ssm_state):
        """One token. h [b, d]; conv_state [b, K-1, ch]; ssm_state [b, h, p, n]."""
        z, xbc, dt = self._split(self.in_proj(h))
        window = jnp.concatenate([conv_state.astype(F32), xbc.astype(F32)[:, None]], axis=1)  # [b, K, ch]
        # The K taps summed one by one: an einsum becomes one tiny dot per channel, and a
        # multiply + reduce a slow reduction fusion on XLA CPU; this is one elementwise fusion.
        taps = self.conv1d.taps()  # [K, ch]
        conv = sum(window[:, k] * taps[k] for k in range(taps.shape[0]))  # [b, ch]
        conv = jax.nn.silu(self.conv1d.add_bias(conv))
        x, B, C, dt, A = self._ssm_inputs(conv, dt)
        y, ssm_state = ssd_step(ssm_state, x, dt, A, B, C)
        return self._output(y, x, z), window[:, 1:].astype(conv_state.dtype), ssm_state


class Block(nnx.Module):
    """Pre-norm residual block around a mixer; the residual stream stays float32."""

    def __init__(self, cfg: Mamba2Config, dtype, rowwise: bool = False):
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.mixer = Mixer(cfg, dtype, rowwise)
        self.dtype = dtype

    def __call__(self, resid, valid, lengths):
        out, conv, ssm = self.mixer(self.norm(resid).astype(self.dtype), valid, lengths)
        return resid + out.astype(F32), conv, ssm

    def step(self, resid, conv, ssm):
        out, conv, ssm = self.mixer.step(self.norm(resid).astype(self.dtype), conv, ssm)
        return resid + out.astype(F32), conv, ssm


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype):
        self.weight = _zeros((vocab, dim), dtype)

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


class Backbone(nnx.Module):
    def __init__(self, cfg: Mamba2Config, dtype, rowwise: bool = False):
        self.embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List([Block(cfg, dtype, rowwise) for _ in range(cfg.num_hidden_layers)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)


class Mamba2LM(nnx.Module):
    """Mamba-2 causal LM: prefill (chunked SSD), an O(1) decode step, and a full forward for tests."""

    def __init__(self, cfg: Mamba2Config, dtype=F32, rowwise_decode: bool = False):
        """rowwise_decode: decode-step matmuls as row-streaming reductions (fast on CPU at b > 1)."""
        self.cfg = cfg
        self.dtype = dtype
        self.rowwise_decode = rowwise_decode
        self.backbone = Backbone(cfg, dtype, rowwise_decode)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)

    def logits(self, resid):
        """float32 logits from the residual stream [..., d]."""
        h = self.backbone.norm_f(resid).astype(self.dtype)
        w = self.backbone.embeddings.weight if self.lm_head is None else self.lm_head.weight
        if self.rowwise_decode and h.ndim == 2:
            return matvec(h, w[...], out_dtype=F32)
        return jnp.einsum("...d,vd->...v", h, w[...], preferred_element_type=F32)

    def _run_layers(self, tokens, lengths):
        """tokens [b, t]; lengths [b]. Returns residual [b, t, d], per-layer residuals, cache."""
        t = tokens.shape[1]
        valid = jnp.arange(t)[None, :] < lengths[:, None]  # [b, t]
        resid = self.backbone.embeddings(tokens).astype(F32)  # [b, t, d]
        hidden, convs, ssms = [], [], []
        for layer in self.backbone.layers:
            resid, conv, ssm = layer(resid, valid, lengths)
            hidden.append(resid)
            convs.append(conv)
            ssms.append(ssm)
        cache = Mamba2Cache(conv=jnp.stack(convs), ssm=jnp.stack(ssms))  # [L, b, ...]
        return resid, hidden, cache

    def prefill(self, tokens, lengths):
        """tokens [b, t] right-padded; lengths [b] in [0, t]. Returns (logits [b, V] at each row's
        last token, cache after each row's own prompt)."""
        resid, _, cache = self._run_layers(tokens, lengths)
        last = jnp.clip(lengths - 1, 0, None)
        resid_last = jnp.take_along_axis(resid, last[:, None, None], axis=1)[:, 0]  # [b, d]
        return self.logits(resid_last), cache

    def forward(self, tokens):
        """All-position logits [b, t, V] and each layer's output residual (tests and verify)."""
        b, t = tokens.shape
        resid, hidden, cache = self._run_layers(tokens, jnp.full((b,), t, jnp.int32))
        return self.logits(resid), hidden, cache

    def step(self, tokens, cache: Mamba2Cache):
        """tokens [b] -> (logits [b, V], cache): one O(1) recurrent step through every layer."""
        logits, convs, ssms = self.step_layers(tokens, list(cache.conv), list(cache.ssm))
        return logits, Mamba2Cache(conv=jnp.stack(convs), ssm=jnp.stack(ssms))

    def step_layers(self, tokens, convs: list, ssms: list):
        """`step` over per-layer state lists ([b, ...] each). Loops carry the cache this way:
        restacking [L, ...] arrays every token costs XLA a full cache copy per step."""
        resid = self.backbone.embeddings(tokens).astype(F32)  # [b, d]
        convs, ssms = list(convs), list(ssms)
        for i, layer in enumerate(self.backbone.layers):
            resid, convs[i], ssms[i] = layer.step(resid, convs[i], ssms[i])
        return self.logits(resid), convs, ssms
