"""The fused decode step's elementwise kernels and its split-K attention, each as a Triton
kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) and as the plain-torch reference that the
CPU path runs and the tests compare against.

What each computes (``dt`` = the activations' dtype; ``round`` = cast to ``dt``):

- :func:`rmsnorm`: ``y = w * round(x * rsqrt(mean(x^2) + eps))`` in fp32, rounded, as Qwen3's
  RMSNorm.
- :func:`qk_rope_cache`: from one row of the QKV GEMM ``[q_0..q_{Hq-1}, k_0..k_{Hkv-1},
  v_0..v_{Hkv-1}]`` (heads of ``D``): per-head RMSNorm of every q and k head (weights
  ``q_norm``, ``k_norm``), then the rotary embedding ``x * cos + rotate_half(x) * sin`` with
  ``rotate_half(x) = [-x[D/2:], x[:D/2]]``; writes the rotated k and the plain v into the
  static cache at the row's ``cache_pos`` and returns the rotated q (B, Hq, D).
- :func:`silu_mul`: ``round(silu(g)) * u`` for ``[g | u]`` = the gate_up GEMM's output.
- :func:`decode_attention_ref` (SDPA over the bucket, masked) and
  :func:`decode_attention_triton`: ``softmax(q k^T * scale) v`` over each row's live keys
  ``[0, cache_pos]``, query head ``h`` reading KV head ``h // (Hq/Hkv)``. The Triton version
  is flash-decoding: the keys are cut into splits, each program keeps a running max ``m``,
  sum ``l`` and output ``o`` over its split (online softmax), and a second kernel combines
  the splits: ``o = sum_s e^{m_s - M} o_s / sum_s e^{m_s - M} l_s`` with ``M = max_s m_s``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - the venv ships Triton; a CPU-only install may not
    triton = None

SPLIT_KEYS = 256    # keys per split of the flash-decoding kernel
# Launch settings of the split kernel; num_warps / num_stages None = Triton's defaults.
# bench/attn_sweep.py measures the alternatives on a GPU (and may set them for a probe).
ATTN_CONFIG = {"split_keys": SPLIT_KEYS, "block_n": 64, "num_warps": None, "num_stages": None}
# Triton 3.8's interpreter returns garbage from a bf16 tl.dot: under it the dots run in fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_ok(x: torch.Tensor) -> bool:
    """Run the Triton kernel for ``x``: on CUDA when Triton imports."""
    return triton is not None and x.is_cuda


# ------------------------------------------------------------------ torch references

def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * round(x * rsqrt(mean(x^2) + eps))`` with the statistics in fp32 (Qwen3 RMSNorm)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_rope_cache_ref(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, cache_pos, q_heads):
    """Reference of :func:`qk_rope_cache` (qkv (B, (Hq+2Hkv)D), cos/sin (B, D), caches
    (>=B, Hkv, T, D)); returns q (B, Hq, D)."""
    B, D = qkv.shape[0], q_norm.numel()
    kv_heads = (qkv.shape[1] // D - q_heads) // 2
    heads = qkv.view(B, -1, D)
    q = rmsnorm_ref(heads[:, :q_heads], q_norm, eps)
    k = rmsnorm_ref(heads[:, q_heads:q_heads + kv_heads], k_norm, eps)
    c, s = cos[:, None], sin[:, None]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    slot = torch.arange(B, device=qkv.device)
    k_cache[slot, :, cache_pos] = k
    v_cache[slot, :, cache_pos] = heads[:, q_heads + kv_heads:]
    return q


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for ``gate_up = [g | u]`` (B, 2I)."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def attention_mask(cache_pos: torch.Tensor, attn_len: int) -> torch.Tensor:
    """(B, 1, 1, attn_len) bool: key ``t`` is visible to row ``b`` when ``t <= cache_pos[b]``."""
    return (torch.arange(attn_len, device=cache_pos.device)[None, :] <= cache_pos[:, None])[:, None, None, :]


def decode_attention_ref(q, k_cache, v_cache, mask, attn_len: int, scale: float) -> torch.Tensor:
    """SDPA over the attention bucket ``[0, attn_len)`` under ``mask`` (:func:`attention_mask`);
    grouped query heads are folded into the query length so each KV head is read once.
    q (B, Hq, D) -> (B, Hq * D)."""
    B, Hq, D = q.shape
    kc, vc = k_cache[:B, :, :attn_len], v_cache[:B, :, :attn_len]
    o = F.scaled_dot_product_attention(q.view(B, kc.shape[1], -1, D), kc, vc, attn_mask=mask, scale=scale)
    return o.reshape(B, Hq * D)


# ------------------------------------------------------------------ dispatch

def rmsnorm(x, w, eps: float):
    """See :func:`rmsnorm_ref`; the Triton kernel on CUDA. ``x`` (B, H)."""
    return rmsnorm_triton(x, w, eps) if triton_ok(x) else rmsnorm_ref(x, w, eps)


def qk_rope_cache(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, cache_pos, q_heads):
    """See :func:`qk_rope_cache_ref`; one Triton kernel on CUDA."""
    fn = qk_rope_cache_triton if triton_ok(qkv) else qk_rope_cache_ref
    return fn(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, cache_pos, q_heads)


def silu_mul(gate_up):
    """See :func:`silu_mul_ref`; the Triton kernel on CUDA."""
    return silu_mul_triton(gate_up) if triton_ok(gate_up) else silu_mul_ref(gate_up)


# ------------------------------------------------------------------ Triton

def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


if triton is not None:
    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, H, eps, BLOCK: tl.constexpr):
        """Row ``program_id``: ``y = w * round(x * rsqrt(sum(x^2) / H + eps))``."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        live = offs < H
        x = tl.load(x_ptr + row * H + offs, mask=live, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        n = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + offs, (n * w).to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _norm_rope(src, w_ptr, cos, sin, offs, partner, live, D, eps):
        """RMSNorm (rounded as Qwen3's) then rotary, of the head at ``src``, in fp32."""
        x = tl.load(src + offs, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(src + partner, mask=live, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        dt = src.dtype.element_ty
        w = tl.load(w_ptr + offs, mask=live, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + partner, mask=live, other=0.0).to(tl.float32)
        n = ((x * r).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)
        n2 = ((x2 * r).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
        rot = tl.where(offs < D // 2, -n2, n2)
        return n * cos + rot * sin

    @triton.jit
    def _qk_rope_cache_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, q_ptr,
                              HQ, HKV, D, eps, kc_b, kc_h, kc_t, vc_b, vc_h, vc_t, BLOCK_D: tl.constexpr):
        """Program (row b, head h): h < HQ -> q[b, h] = rope(norm(q_h)); else KV head j = h - HQ:
        k_cache[b, j, pos_b] = rope(norm(k_j)), v_cache[b, j, pos_b] = v_j."""
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)   # int64: b * kc_b passes 2^31 in long caches
        offs = tl.arange(0, BLOCK_D)
        live = offs < D
        partner = (offs + D // 2) % D
        cos = tl.load(cos_ptr + b * D + offs, mask=live, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * D + offs, mask=live, other=0.0).to(tl.float32)
        row = qkv_ptr + b * (HQ + 2 * HKV) * D
        if h < HQ:
            y = _norm_rope(row + h * D, qn_ptr, cos, sin, offs, partner, live, D, eps)
            tl.store(q_ptr + (b * HQ + h) * D + offs, y.to(q_ptr.dtype.element_ty), mask=live)
        else:
            j = h - HQ
            t = tl.load(pos_ptr + b)
            y = _norm_rope(row + h * D, kn_ptr, cos, sin, offs, partner, live, D, eps)
            tl.store(kc_ptr + b * kc_b + j * kc_h + t * kc_t + offs, y.to(kc_ptr.dtype.element_ty), mask=live)
            v = tl.load(row + (HQ + HKV + j) * D + offs, mask=live, other=0.0)
            tl.store(vc_ptr + b * vc_b + j * vc_h + t * vc_t + offs, v.to(vc_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, INTER, BLOCK: tl.constexpr):
        """Block c of row b: ``y = round(g * sigmoid(g)) * u``, ``[g | u]`` = the row of gu."""
        b, c = tl.program_id(0), tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        live = offs < INTER
        g = tl.load(gu_ptr + b * 2 * INTER + offs, mask=live, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + b * 2 * INTER + INTER + offs, mask=live, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + b * INTER + offs, (s * u).to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _attn_split_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale,
                           HQ, HKV, D, SPLITS, CHUNK, kc_b, kc_h, kc_t, vc_b, vc_h, vc_t,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           IEEE: tl.constexpr):
        """Program (row b, KV head j, split s): online softmax of the G query heads of j over keys
        ``[s * CHUNK, min((s + 1) * CHUNK, pos_b + 1))``; stores the unnormalised output
        ``sum_n e^{x_n - m} v_n``, the max ``m`` and the sum ``l = sum_n e^{x_n - m}``."""
        b, j, s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        length = tl.load(pos_ptr + b) + 1
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gd_live = (g[:, None] < G) & (d[None, :] < D)
        q = tl.load(q_ptr + (b * HQ + j * G + g[:, None]) * D + d[None, :], mask=gd_live, other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        lsum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        start = s * CHUNK
        stop = tl.minimum(start + CHUNK, length)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nd_live = (n[:, None] < stop) & (d[None, :] < D)
            k = tl.load(kc_ptr + b * kc_b + j * kc_h + n[:, None] * kc_t + d[None, :], mask=nd_live, other=0.0)
            v = tl.load(vc_ptr + b * vc_b + j * vc_h + n[:, None] * vc_t + d[None, :], mask=nd_live, other=0.0)
            if IEEE:
                sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(n[None, :] < stop, sc * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m - m_new)
            lsum = lsum * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        base = ((b * HKV + j) * SPLITS + s) * G
        tl.store(o_ptr + (base + g[:, None]) * D + d[None, :], acc, mask=gd_live)
        tl.store(m_ptr + base + g, m, mask=g < G)
        tl.store(l_ptr + base + g, lsum, mask=g < G)

    @triton.jit
    def _attn_combine_kernel(o_ptr, m_ptr, l_ptr, y_ptr, HQ, HKV, D, SPLITS, G: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (row b, query head h): ``y = sum_s e^{m_s - M} o_s / sum_s e^{m_s - M} l_s``."""
        b, h = tl.program_id(0), tl.program_id(1)
        j, gi = h // G, h % G
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        idx = ((b * HKV + j) * SPLITS + s) * G + gi
        m = tl.load(m_ptr + idx, mask=s < SPLITS, other=float("-inf"))
        lsum = tl.load(l_ptr + idx, mask=s < SPLITS, other=0.0)
        big = tl.max(m, axis=0)
        wgt = tl.where(s < SPLITS, tl.exp(m - big), 0.0)
        o = tl.load(o_ptr + idx[:, None] * D + d[None, :], mask=(s[:, None] < SPLITS) & (d[None, :] < D), other=0.0)
        y = tl.sum(o * wgt[:, None], axis=0) / tl.sum(lsum * wgt, axis=0)
        tl.store(y_ptr + (b * HQ + h) * D + d, y.to(y_ptr.dtype.element_ty), mask=d < D)


def rmsnorm_triton(x, w, eps: float):
    """:func:`rmsnorm_ref` as one kernel, one program per row."""
    y = torch.empty_like(x)
    _rmsnorm_kernel[(x.shape[0],)](x, w, y, x.shape[1], eps, BLOCK=_pow2(x.shape[1]))
    return y


def qk_rope_cache_triton(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, cache_pos, q_heads):
    """:func:`qk_rope_cache_ref` as one kernel, one program per (row, q or k head)."""
    B, D = qkv.shape[0], q_norm.numel()
    kv_heads = (qkv.shape[1] // D - q_heads) // 2
    q = torch.empty(B, q_heads, D, dtype=qkv.dtype, device=qkv.device)
    cos, sin = cos.reshape(B, D).contiguous(), sin.reshape(B, D).contiguous()
    ks, vs = k_cache.stride(), v_cache.stride()
    assert ks[3] == 1 and vs[3] == 1 and qkv.is_contiguous()
    _qk_rope_cache_kernel[(B, q_heads + kv_heads)](qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, cache_pos, q,
                                                    q_heads, kv_heads, D, eps, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
                                                    BLOCK_D=_pow2(D))
    return q


def silu_mul_triton(gate_up, block: int = 1024):
    """:func:`silu_mul_ref` as one kernel."""
    B, inter = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(B, inter, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(B, triton.cdiv(inter, block))](gate_up, y, inter, BLOCK=block)
    return y


def decode_attention_triton(q, k_cache, v_cache, cache_pos, attn_len: int, scale: float,
                            split_keys: int | None = None, block_n: int | None = None):
    """Flash-decoding (see the module docstring): ``ceil(attn_len / split_keys)`` splits per
    (row, KV head); a split past a row's live length exits at once. q (B, Hq, D) -> (B, Hq*D).
    Dots run on the tensor cores in bf16/fp16 (fp32 accumulate), in exact fp32 for fp32."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    split_keys = split_keys or ATTN_CONFIG["split_keys"]
    block_n = block_n or ATTN_CONFIG["block_n"]
    launch = {k: ATTN_CONFIG[k] for k in ("num_warps", "num_stages") if ATTN_CONFIG[k] is not None}
    splits = -(-attn_len // split_keys)
    o = torch.empty(B, Hkv, splits, G, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, Hkv, splits, G, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    ks, vs = k_cache.stride(), v_cache.stride()
    assert ks[3] == 1 and vs[3] == 1 and q.is_contiguous()
    _attn_split_kernel[(B, Hkv, splits)](q, k_cache, v_cache, cache_pos, o, m, lsum, scale, Hq, Hkv, D, splits,
                                         split_keys, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], G=G,
                                         BLOCK_G=max(16, _pow2(G)), BLOCK_N=block_n, BLOCK_D=max(16, _pow2(D)),
                                         IEEE=q.dtype == torch.float32 or INTERPRET, **launch)
    y = torch.empty(B, Hq * D, dtype=q.dtype, device=q.device)
    _attn_combine_kernel[(B, Hq)](o, m, lsum, y, Hq, Hkv, D, splits, G=G, BLOCK_S=max(2, _pow2(splits)),
                                  BLOCK_D=_pow2(D))
    return y
