"""Building blocks of the hybrid models: attention with a static-capacity KV cache, MLPs, and
mixtures of experts. Parameters keep PyTorch's (out, in) layout and HF checkpoint names.

Shapes: b batch, t new tokens, c KV capacity (static), H query heads, G KV heads (H = G * r),
D head_dim, d hidden size, E experts, k experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from exporter.model import Conv1d, Linear, _zeros
from exporter.numerics import Numerics

F32 = jnp.float32
KV_BLOCK = 256  # keys per online-softmax block (the exporter rounds KV capacities up to a multiple)


def activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu2":
        return jnp.square(jax.nn.relu(x))
    if name == "gelu":  # exact (erf) GELU, as HF's "gelu"
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}")


# ---------------------------------------------------------------------------------------------
# RoPE (HF's rotate_half convention: the rotated dims are split in halves, not interleaved)


def rope_tables(positions, rotary_dim: int, theta: float):
    """cos, sin [..., rotary_dim] float32 for integer positions [...]."""
    # inverse frequencies in float32 exactly as HF computes them
    exps = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)  # [rotary_dim / 2]
    angles = positions.astype(F32)[..., None] * inv_freq  # [..., rotary_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x [b, t, heads, D]; cos, sin [b, t, R] (R <= D): rotate the first R dims of every head."""
    R = cos.shape[-1]
    xr, rest = x[..., :R].astype(F32), x[..., R:]
    x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xr * cos[:, :, None] + rotated * sin[:, :, None]
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution continuing from a window of past inputs


def conv_prefill(conv: Conv1d, x, window, lengths):
    """x [b, t, C] after window [b, K-1, C] (the previous K-1 inputs; zeros = fresh). Returns
    (y [b, t, C] float32, no activation; the window ending at each row's length, window dtype)."""
    K = conv.weight.shape[-1]
    t = x.shape[1]
    padded = jnp.concatenate([window.astype(F32), x.astype(F32)], axis=1)  # [b, K-1+t, C]
    taps = conv.taps()  # [K, C]
    y = conv.add_bias(sum(padded[:, k:k + t] * taps[k] for k in range(K)))
    idx = lengths[:, None] + jnp.arange(K - 1)[None, :]  # [b, K-1]
    return y, jnp.take_along_axis(padded, idx[:, :, None], axis=1).astype(window.dtype)


def conv_step(conv: Conv1d, x, window, active):
    """One input x [b, C]; rows not active keep their window. Returns (y [b, C] float32, window)."""
    full = jnp.concatenate([window.astype(F32), x.astype(F32)[:, None]], axis=1)  # [b, K, C]
    taps = conv.taps()
    y = conv.add_bias(sum(full[:, k] * taps[k] for k in range(taps.shape[0])))
    return y, jnp.where(active[:, None, None], full[:, 1:].astype(window.dtype), window)


# ---------------------------------------------------------------------------------------------
# Attention over a static-capacity KV cache


def kv_block(capacity: int) -> int:
    """The key block size used for a cache of this capacity."""
    return min(KV_BLOCK, capacity)


def attend(q, k_cache, v_cache, q_pos, n_keys, scale: float, precision=None):
    """Causal attention of new queries over the cache, blockwise with an online softmax.

    q [b, t, H, D]; k_cache, v_cache [b, c, G, D]; q_pos [b, t] int32: each query's absolute
    position (it sees keys at positions <= q_pos); n_keys: int32 scalar, the most keys any valid
    query needs (blocks past it are skipped: cost grows with the context, not the capacity).
    Returns [b, t, H, D] float32.

    Peak memory: one block of scores, b * H * t * KV_BLOCK * 4 bytes, whatever the capacity
    (never [t, c] for all heads); e.g. a 8192-token prompt with 32 heads: 268 MB per row,
    below the Mamba layers' own SSD peak (b * H_mamba * t * chunk * 4).
    """
    b, t, H, D = q.shape
    c, G = k_cache.shape[1], k_cache.shape[2]
    r = H // G
    block = kv_block(c)
    qg = q.reshape(b, t, G, r, D)
    n_blocks = jnp.minimum((n_keys + block - 1) // block, -(-c // block))

    def body(i, carry):
        m, l, acc = carry  # [b, G, r, t], [b, G, r, t], [b, G, r, t, D]
        # Block i covers keys [i*B, (i+1)*B); when c is not a multiple of B the last block is read
        # as the cache's final B keys and its keys before i*B (already counted) are masked.
        start = jnp.minimum(i * block, c - block)
        kb = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=1)  # [b, B, G, D]
        vb = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=1)
        s = jnp.einsum("btgrd,bsgd->bgrts", qg, kb.astype(qg.dtype), preferred_element_type=F32,
                       precision=precision) * scale
        key_pos = start + jnp.arange(block)
        visible = ((key_pos[None, None, None, None, :] <= q_pos[:, None, None, :, None])
                   & (key_pos >= i * block)[None, None, None, None, :])  # [b, 1, 1, t, B]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])  # masked keys: exp(-inf) = 0
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(axis=-1)
        pv = jnp.einsum("bgrts,bsgd->bgrtd", p.astype(vb.dtype), vb, preferred_element_type=F32,
                        precision=precision)
        return m_new, l, acc * corr[..., None] + pv

    # A finite start for the running max: a block with no visible key then adds exactly 0.
    m0 = jnp.full((b, G, r, t), -1e30, F32)
    init = (m0, jnp.zeros((b, G, r, t), F32), jnp.zeros((b, G, r, t, D), F32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with no keys at all (lengths 0): 0
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, H, D)


class Attention(nnx.Module):
    """GQA self-attention (q/k/v/o_proj) with optional partial RoPE, over a KV cache [b, c, G, D]."""

    def __init__(self, cfg, dtype, numerics: Numerics):
        d, H, G, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d_in, bias = cfg.attention_in_size or d, cfg.attention_bias
        self.q_proj = Linear(d_in, H * D, bias, dtype, numerics)
        self.k_proj = Linear(d_in, G * D, bias, dtype, numerics)
        self.v_proj = Linear(d_in, G * D, bias, dtype, numerics)
        self.o_proj = Linear(H * D, d, bias, dtype, numerics)
        self.heads, self.kv_heads, self.head_dim = H, G, D
        self.scale, self.key_multiplier = cfg.scale, cfg.key_multiplier
        self.precision = numerics.precision("matmul")

    def _project(self, h, adapter):
        """q, k, v projections of h [..., d_in] (`adapter`: which of Zamba2's per-layer adapters)."""
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def _heads(self, q, k, v, lead, rope):
        """Flat projections -> q [b, t, H, D], k, v [b, t, G, D], RoPE applied."""
        q = q.reshape(*lead, self.heads, self.head_dim)
        k = k.reshape(*lead, self.kv_heads, self.head_dim)
        v = v.reshape(*lead, self.kv_heads, self.head_dim)
        if self.key_multiplier != 1.0:  # Falcon-H1
            k = k * self.key_multiplier
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    @staticmethod
    def _write(cache, new, slots):
        """cache [b, c, G, D] with new [b, t, G, D] written at slots [b, t] (slot c: dropped)."""
        rows = jnp.broadcast_to(jnp.arange(cache.shape[0])[:, None], slots.shape)
        return cache.at[rows, slots].set(new.astype(cache.dtype), mode="drop")

    def _out(self, o, lead):
        return self.o_proj(o.reshape(*lead, self.heads * self.head_dim).astype(self.o_proj.weight.dtype))

    def prefill_core(self, q, k, v, pos, valid, lengths, kv):
        """q [b, t, H, D], k, v [b, t, G, D] at positions pos + j. New keys go to slots pos + j for
        valid j only (masked writes). Returns (out [b, t, d], (k_cache, v_cache))."""
        k_cache, v_cache = kv
        b, t = q.shape[:2]
        c = k_cache.shape[1]
        q_pos = pos[:, None] + jnp.arange(t)[None, :]  # [b, t]
        slots = jnp.where(valid & (q_pos < c), q_pos, c)
        k_cache, v_cache = self._write(k_cache, k, slots), self._write(v_cache, v, slots)
        o = attend(q, k_cache, v_cache, q_pos, jnp.max(pos + lengths), self.scale, self.precision)
        return self._out(o, (b, t)), (k_cache, v_cache)

    def step_core(self, q, k, v, pos, active, kv):
        """One token per row (q [b, 1, H, D]) at position pos[i]; inactive rows write nothing."""
        k_cache, v_cache = kv
        c = k_cache.shape[1]
        slots = jnp.where(active & (pos < c), pos, c)[:, None]  # [b, 1]
        k_cache, v_cache = self._write(k_cache, k, slots), self._write(v_cache, v, slots)
        o = attend(q, k_cache, v_cache, pos[:, None], jnp.max(pos) + 1, self.scale, self.precision)
        return self._out(o[:, 0], (q.shape[0],)), (k_cache, v_cache)

    def __call__(self, h, rope, pos, valid, lengths, kv, adapter=None):
        """Prefill: h [b, t, d]; pos [b] tokens already cached; valid [b, t]; lengths [b]."""
        q, k, v = self._heads(*self._project(h, adapter), h.shape[:2], rope)
        return self.prefill_core(q, k, v, pos, valid, lengths, kv)

    def step(self, h, rope, pos, active, kv, adapter=None):
        """Decode: h [b, d]; the token of row i sits at position pos[i]."""
        q, k, v = self._heads(*self._project(h, adapter), (h.shape[0], 1), rope)
        return self.step_core(q, k, v, pos, active, kv)


# ---------------------------------------------------------------------------------------------
# Dense feed-forward blocks


class MambaSSMAttention(Attention):
    """mamba_ssm's MHA: one in_proj for q | k | v (rows: H heads, then G keys, then G values), an
    optional causal depthwise conv over them (no activation), partial RoPE, out_proj."""

    def __init__(self, cfg, dtype, numerics: Numerics):
        d, H, G, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        out_bias = cfg.attention_bias if cfg.attention_out_bias is None else cfg.attention_out_bias
        self.in_proj = Linear(d, (H + 2 * G) * D, cfg.attention_bias, dtype, numerics)
        self.conv1d = Conv1d((H + 2 * G) * D, cfg.attention_conv, True, dtype) if cfg.attention_conv else None
        self.out_proj = Linear(H * D, d, out_bias, dtype, numerics)
        self.heads, self.kv_heads, self.head_dim = H, G, D
        self.scale, self.key_multiplier = cfg.scale, 1.0
        self.precision = numerics.precision("matmul")

    @property
    def o_proj(self):
        return self.out_proj

    def _split(self, qkv):
        HD, GD = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return qkv[..., :HD], qkv[..., HD:HD + GD], qkv[..., HD + GD:]

    def __call__(self, h, rope, pos, valid, lengths, kv, window=None):
        """As Attention, plus the conv window [b, K-1, C] (None without a conv). Returns
        (out, (k, v), window)."""
        qkv = self.in_proj(h)  # [b, t, C]
        if self.conv1d is not None:
            qkv, window = conv_prefill(self.conv1d, qkv, window, lengths)
            qkv = qkv.astype(h.dtype)
        q, k, v = self._heads(*self._split(qkv), h.shape[:2], rope)
        out, kv = self.prefill_core(q, k, v, pos, valid, lengths, kv)
        return out, kv, window

    def step(self, h, rope, pos, active, kv, window=None):
        qkv = self.in_proj(h)  # [b, C]
        if self.conv1d is not None:
            qkv, window = conv_step(self.conv1d, qkv, window, active)
            qkv = qkv.astype(h.dtype)
        q, k, v = self._heads(*self._split(qkv), (h.shape[0], 1), rope)
        out, kv = self.step_core(q, k, v, pos, active, kv)
        return out, kv, window


class GatedMLP(nnx.Module):
    """down(act(gate(x) * gm) * up(x)) * dm: Bamba's and Falcon-H1's feed_forward (gm, dm: Falcon's
    muP multipliers, 1 elsewhere)."""

    def __init__(self, d: int, inner: int, bias: bool, act: str, dtype, numerics: Numerics,
                 gate_multiplier: float = 1.0, down_multiplier: float = 1.0):
        self.gate_proj = Linear(d, inner, bias, dtype, numerics)
        self.up_proj = Linear(d, inner, bias, dtype, numerics)
        self.down_proj = Linear(inner, d, bias, dtype, numerics)
        self.act, self.gate_multiplier, self.down_multiplier = act, gate_multiplier, down_multiplier

    def __call__(self, x):
        gate = self.gate_proj(x).astype(F32)
        if self.gate_multiplier != 1.0:
            gate = gate * self.gate_multiplier
        h = activation(self.act, gate) * self.up_proj(x).astype(F32)
        out = self.down_proj(h.astype(self.down_proj.weight.dtype))
        return out * self.down_multiplier if self.down_multiplier != 1.0 else out


class MambaSSMMLP(nnx.Module):
    """mamba_ssm's GatedMLP: fc1 -> [y | gate] halves -> y * silu(gate) -> fc2 (no biases)."""

    def __init__(self, d: int, inner: int, dtype, numerics: Numerics):
        self.fc1 = Linear(d, 2 * inner, False, dtype, numerics)
        self.fc2 = Linear(inner, d, False, dtype, numerics)

    def __call__(self, x):
        y, gate = jnp.split(self.fc1(x).astype(F32), 2, axis=-1)
        return self.fc2((y * jax.nn.silu(gate)).astype(self.fc2.weight.dtype))


class PlainMLP(nnx.Module):
    """down(act(up(x))): Nemotron-H's MLP (ReLU^2) and its shared experts."""

    def __init__(self, d: int, inner: int, bias: bool, act: str, dtype, numerics: Numerics):
        self.up_proj = Linear(d, inner, bias, dtype, numerics)
        self.down_proj = Linear(inner, d, bias, dtype, numerics)
        self.act = act

    def __call__(self, x):
        h = activation(self.act, self.up_proj(x).astype(F32))
        return self.down_proj(h.astype(self.down_proj.weight.dtype))


class FusedGatedMLP(nnx.Module):
    """Granite's shared_mlp: input_linear -> [gate | up] halves -> act(gate) * up -> output_linear."""

    def __init__(self, d: int, inner: int, act: str, dtype, numerics: Numerics):
        self.input_linear = Linear(d, 2 * inner, False, dtype, numerics)
        self.output_linear = Linear(inner, d, False, dtype, numerics)
        self.act = act

    def __call__(self, x):
        gate, up = jnp.split(self.input_linear(x).astype(F32), 2, axis=-1)
        return self.output_linear((activation(self.act, gate) * up).astype(self.output_linear.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Mixture of experts: exact top-k routing, computed tile by tile over expert-sorted assignments

MOE_TILE = 64  # prefill rows per expert tile; decode uses 1 (each assignment reads its expert once)


def top_k(x, k: int):
    """(values, indices) of the k largest along the last axis, ties to the lower index (as
    lax.top_k), by a stable sort: lax.top_k lowers to a composite op that TF's XlaCallModule (the
    SavedModel) cannot read; routers sort a few dozen experts, a negligible cost."""
    idx = jnp.argsort(-x, axis=-1, stable=True)[..., :k]
    return jnp.take_along_axis(x, idx, axis=-1), idx


def routed_experts(x, idx, weights, num_experts: int, expert_fn, out_dim: int, tile: int):
    """sum_j weights[n, j] * expert_fn(x[n], idx[n, j]) for every token n, exactly.

    x [N, d]; idx, weights [N, k]; expert_fn(xs [tile, d], e: int32 scalar) -> [tile, out_dim].
    Returns [N, out_dim] float32. The N*k assignments are sorted by expert and each expert's run
    is padded to a multiple of `tile`, so every tile of rows belongs to one expert; a loop then
    runs only the tiles in use, each reading its expert's weights once. Work: N*k rows plus at
    most E*(tile-1) padding rows; memory: O(N*k + tile*d) besides the output.
    """
    N, d = x.shape
    k = idx.shape[1]
    A = N * k
    e = idx.reshape(A).astype(jnp.int32)
    order = jnp.argsort(e, stable=True)
    e_sorted = e[order]
    tok_sorted = (jnp.arange(A, dtype=jnp.int32) // k)[order]
    w_sorted = weights.reshape(A)[order].astype(F32)
    counts = jnp.zeros((num_experts,), jnp.int32).at[e].add(1)  # [E]
    padded = (counts + tile - 1) // tile * tile
    pad_ends = jnp.cumsum(padded)
    rank = jnp.arange(A, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[e_sorted]
    dest = (pad_ends - padded)[e_sorted] + rank  # [A]: row in the padded, expert-sorted layout
    n_rows = (A + num_experts * (tile - 1) + tile - 1) // tile * tile  # static bound
    row_tok = jnp.full((n_rows,), N, jnp.int32).at[dest].set(tok_sorted)  # N: a zero row
    row_w = jnp.zeros((n_rows,), F32).at[dest].set(w_sorted)
    tile_start = jnp.arange(n_rows // tile, dtype=jnp.int32) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(pad_ends, tile_start, side="right"), num_experts - 1)
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)  # [N + 1, d]

    def body(j, out):
        rows = jax.lax.dynamic_slice_in_dim(row_tok, j * tile, tile)
        w = jax.lax.dynamic_slice_in_dim(row_w, j * tile, tile)
        y = expert_fn(x_pad[rows], tile_expert[j]).astype(F32) * w[:, None]
        return out.at[rows].add(y)

    out = jax.lax.fori_loop(0, pad_ends[-1] // tile, body, jnp.zeros((N + 1, out_dim), F32))
    return out[:N]  # [N, out_dim] float32


def _expert_tile(x):
    """Tile size for N routed rows: 1 for a decode step ([b, d]), MOE_TILE for prefill."""
    return 1 if x.ndim == 2 else MOE_TILE


class Weight(nnx.Module):
    """A bare `weight` parameter (stacked expert weights, routers named `.weight` in checkpoints)."""

    def __init__(self, shape, dtype):
        self.weight = _zeros(shape, dtype)


class GraniteRouter(nnx.Module):
    def __init__(self, d: int, E: int, dtype, numerics: Numerics):
        self.layer = Linear(d, E, False, dtype, numerics)


class GraniteMoE(nnx.Module):
    """Granite's block_sparse_moe: softmax over the top-k router logits; gated SiLU experts
    input_linear [E, 2I, d] (gate | up), output_linear [E, d, I]."""

    def __init__(self, cfg, dtype, numerics: Numerics):
        E, I, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.router = GraniteRouter(d, E, dtype, numerics)
        self.input_linear = Weight((E, 2 * I, d), dtype)
        self.output_linear = Weight((E, d, I), dtype)
        self.k, self.E = cfg.experts_per_tok, E
        self.precision = numerics.precision("matmul")

    def __call__(self, x):
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # [N, d]
        logits = self.router.layer(flat).astype(F32)  # [N, E]
        top, idx = top_k(logits, self.k)
        weights = jax.nn.softmax(top, axis=-1).astype(x.dtype)
        w_in, w_out = self.input_linear.weight[...], self.output_linear.weight[...]

        def expert(xs, e):
            gate, up = jnp.split(jnp.einsum("td,od->to", xs, w_in[e], preferred_element_type=F32,
                                            precision=self.precision), 2, axis=-1)
            h = (jax.nn.silu(gate) * up).astype(w_out.dtype)
            return jnp.einsum("ti,oi->to", h, w_out[e], preferred_element_type=F32, precision=self.precision)

        y = routed_experts(flat, idx, weights, self.E, expert, d, _expert_tile(x))
        return y.astype(x.dtype).reshape(*lead, d)


class NemotronRouter(nnx.Module):
    """Nemotron-H's top-k router: sigmoid scores, a score-correction bias for the choice only,
    group-limited selection, weights normalised and scaled. Parameters stay float32 (as in HF)."""

    def __init__(self, cfg):
        self.weight = _zeros((cfg.num_experts, cfg.hidden_size), F32)
        self.e_score_correction_bias = _zeros((cfg.num_experts,), F32)
        self.cfg = cfg

    def __call__(self, x):
        """x [N, d] -> (idx [N, k] int32, weights [N, k] float32)."""
        c = self.cfg
        N = x.shape[0]
        # float32 at full precision on every backend: routing is a discrete choice
        logits = jnp.einsum("nd,ed->ne", x.astype(F32), self.weight[...], precision=jax.lax.Precision.HIGHEST)
        scores = jax.nn.sigmoid(logits)  # [N, E]
        choice = scores + self.e_score_correction_bias[...]
        if c.n_group > 1:
            grouped = choice.reshape(N, c.n_group, c.num_experts // c.n_group)
            group_score = top_k(grouped, 2)[0].sum(-1)  # [N, n_group]
            _, keep = top_k(group_score, c.topk_group)
            group_mask = jnp.zeros((N, c.n_group), bool).at[jnp.arange(N)[:, None], keep].set(True)
            choice = jnp.where(jnp.repeat(group_mask, c.num_experts // c.n_group, axis=1), choice, -jnp.inf)
        _, idx = top_k(choice, c.experts_per_tok)
        weights = jnp.take_along_axis(scores, idx, axis=1)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return idx, weights * c.routed_scaling_factor


class NemotronExperts(nnx.Module):
    """Stacked ReLU^2 experts: up_proj [E, I, m], down_proj [E, m, I] (m: hidden or latent size)."""

    def __init__(self, cfg, dtype):
        m = cfg.moe_latent_size or cfg.hidden_size
        self.up_proj = _zeros((cfg.num_experts, cfg.moe_intermediate_size, m), dtype)
        self.down_proj = _zeros((cfg.num_experts, m, cfg.moe_intermediate_size), dtype)


class NemotronMoE(nnx.Module):
    """Nemotron-H's MoE block: routed ReLU^2 experts (optionally in a latent space) + a shared MLP."""

    def __init__(self, cfg, dtype, numerics: Numerics):
        d, latent = cfg.hidden_size, cfg.moe_latent_size
        self.gate = NemotronRouter(cfg)
        self.experts = NemotronExperts(cfg, dtype)
        self.shared_experts = PlainMLP(d, cfg.shared_intermediate_size, cfg.mlp_bias, cfg.mlp_act, dtype, numerics)
        self.fc1_latent_proj = Linear(d, latent, cfg.mlp_bias, dtype, numerics) if latent else None
        self.fc2_latent_proj = Linear(latent, d, cfg.mlp_bias, dtype, numerics) if latent else None
        self.act, self.E = cfg.mlp_act, cfg.num_experts
        self.precision = numerics.precision("matmul")

    def __call__(self, x):
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # [N, d]
        idx, weights = self.gate(flat)
        h = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)
        up, down = self.experts.up_proj[...], self.experts.down_proj[...]

        def expert(xs, e):
            a = activation(self.act, jnp.einsum("tm,im->ti", xs, up[e], preferred_element_type=F32,
                                                precision=self.precision))
            return jnp.einsum("ti,mi->tm", a.astype(down.dtype), down[e], preferred_element_type=F32,
                              precision=self.precision)

        y = routed_experts(h, idx, weights, self.E, expert, h.shape[-1], _expert_tile(x)).astype(x.dtype)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        return (y + self.shared_experts(flat)).reshape(*lead, d)
