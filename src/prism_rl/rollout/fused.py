"""The graph engine's fused decode path: its own copy of a dense Qwen3-VL text decoder in a
layout made for one-token steps, and the step over it.

Why: the module path launches ~45 small kernels a layer (casts, rotary halves, residual adds,
three q/k/v GEMMs, two gate/up GEMMs, SiLU, mul). Here a layer is

    x  = RMSNorm(h; w_in)                               one kernel
    qkv = x W_qkv^T,  W_qkv = [W_q; W_k; W_v]           one GEMM
    q  = rope(RMSNorm_head(q; w_qn)); cache[pos] <- rope(RMSNorm_head(k; w_kn)), v   one kernel
    o  = attention(q, cache[: pos + 1])                 SDPA, or the split-K kernel
    h  = h + o W_o^T                                    one GEMM (addmm, the residual fused)
    x  = RMSNorm(h; w_post)
    a  = silu(x W_g^T) * (x W_u^T),  [W_g; W_u] one GEMM, then one kernel
    h  = h + a W_down^T                                 addmm

which is the module path's math (kernels in :mod:`.kernels`; Triton on CUDA, torch on CPU).
The weights are the engine's own buffers in the decode dtype, cast-copied from the policy by
:meth:`FusedDecoder.refresh` before every ``generate`` (so it always samples the current
policy, and the buffers' addresses stay fixed for the captured CUDA graphs). A peft LoRA
Linear contributes its effective weight (:func:`effective_weight`).
"""

from __future__ import annotations

import torch

from ..models.lora import effective_weight, is_lora_layer
from . import kernels as K

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _linear_reason(module, name: str) -> str | None:
    if is_lora_layer(module):
        if getattr(module, "lora_variant", {}) or any(getattr(module, "lora_bias", {}).values()):
            return f"{name} is a LoRA variant (DoRA, ...) or has a LoRA bias"
        module = module.get_base_layer()
    if not isinstance(module, torch.nn.Linear):
        return f"{name} is a {type(module).__name__}, not a Linear"
    if module.bias is not None:
        return f"{name} has a bias"
    return None


def _norm_reason(norm, name: str) -> str | None:
    if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
        return f"{name} is a {type(norm).__name__}, not a Qwen3 RMSNorm"
    return None


def unfusable_reason(lm) -> str | None:
    """Why the text decoder ``lm`` cannot take the fused path (``None``: it can): every layer
    must be a dense Qwen3-VL layer (q/k/v/o and gate/up/down Linears without bias, SiLU, Qwen3
    RMSNorms, q/k norms). MoE layers and anything else keep the module path."""
    for i, layer in enumerate(lm.layers):
        a, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if a is None or mlp is None or not all(hasattr(a, n) for n in (*_LINEARS, "q_norm", "k_norm")):
            return f"layer {i}: not a Qwen3-VL attention layer"
        if not all(hasattr(mlp, n) for n in _MLP):
            return f"layer {i}: the MLP is a {type(mlp).__name__} (MoE or other), not gate/up/down"
        if "SiLU" not in type(getattr(mlp, "act_fn", None)).__name__:
            return f"layer {i}: the MLP's activation is not SiLU"
        checks = [_linear_reason(getattr(a, n), f"layer {i} {n}") for n in _LINEARS]
        checks += [_linear_reason(getattr(mlp, n), f"layer {i} {n}") for n in _MLP]
        checks += [_norm_reason(getattr(layer, n), f"layer {i} {n}") for n in ("input_layernorm", "post_attention_layernorm")]
        checks += [_norm_reason(getattr(a, n), f"layer {i} {n}") for n in ("q_norm", "k_norm")]
        if getattr(a.q_norm, "variance_epsilon", None) != getattr(a.k_norm, "variance_epsilon", None):
            checks.append(f"layer {i}: q_norm and k_norm have different eps")
        reason = next((r for r in checks if r is not None), None)
        if reason is not None:
            return reason
    return _norm_reason(lm.norm, "the final norm")


class _Layer:
    """One layer's decode weights: W_qkv ((Hq+2Hkv)D, H), W_gate_up (2I, H), W_o, W_down and the
    four norm weights, all in the decode dtype."""

    def __init__(self, layer, dtype):
        a, mlp = layer.self_attn, layer.mlp
        dev = effective_weight(a.o_proj).device

        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=dev)

        q, k, v = (effective_weight(getattr(a, n)).shape for n in ("q_proj", "k_proj", "v_proj"))
        self.splits = (q[0], k[0], v[0])
        self.qkv = empty(q[0] + k[0] + v[0], q[1])
        g = effective_weight(mlp.gate_proj).shape
        self.gate_up = empty(2 * g[0], g[1])
        self.o = empty(*effective_weight(a.o_proj).shape)
        self.down = empty(*effective_weight(mlp.down_proj).shape)
        self.norms = {n: empty(m.weight.shape) for n, m in self._norms(layer).items()}
        self.eps = {n: float(m.variance_epsilon) for n, m in self._norms(layer).items()}
        self.q_heads, self.head_dim, self.scaling = q[0] // a.head_dim, a.head_dim, float(a.scaling)

    @staticmethod
    def _norms(layer) -> dict:
        a = layer.self_attn
        return {"in": layer.input_layernorm, "post": layer.post_attention_layernorm, "q": a.q_norm, "k": a.k_norm}

    @torch.no_grad()
    def refresh(self, layer) -> None:
        a, mlp = layer.self_attn, layer.mlp
        for dst, src in zip(self.qkv.split(self.splits), (a.q_proj, a.k_proj, a.v_proj)):
            dst.copy_(effective_weight(src))
        inter = self.gate_up.shape[0] // 2
        self.gate_up[:inter].copy_(effective_weight(mlp.gate_proj))
        self.gate_up[inter:].copy_(effective_weight(mlp.up_proj))
        self.o.copy_(effective_weight(a.o_proj))
        self.down.copy_(effective_weight(mlp.down_proj))
        for n, m in self._norms(layer).items():
            self.norms[n].copy_(m.weight)


class FusedDecoder:
    """The decode weights of a dense text decoder ``lm`` and output ``head`` in ``dtype``, and
    the fused step over them. The embedding and head are read from the policy when they already
    have the decode dtype (no copy; ``refresh`` reports when their storage moved), else copied
    (once when they are tied)."""

    def __init__(self, lm, head, dtype: torch.dtype, split_k: bool = False):
        reason = unfusable_reason(lm)
        if reason is not None:
            raise ValueError(f"the fused decode path needs a dense Qwen3-VL text decoder: {reason}")
        self.dtype, self.split_k = dtype, split_k
        self.layers = [_Layer(layer, dtype) for layer in lm.layers]
        self.norm = torch.empty_like(lm.norm.weight, dtype=dtype)
        self.norm_eps = float(lm.norm.variance_epsilon)
        self.embed = self._shared_or_copy(lm.embed_tokens.weight)
        tied = head.weight is lm.embed_tokens.weight
        self.head = self.embed if tied else self._shared_or_copy(head.weight)    # tied: one copy
        self.refresh(lm, head)

    def _shared_or_copy(self, w: torch.Tensor) -> torch.Tensor:
        return w if w.dtype == self.dtype else torch.empty_like(w, dtype=self.dtype)

    @torch.no_grad()
    def refresh(self, lm, head) -> bool:
        """Cast-copy the policy's current weights in; ``True`` when a shared tensor (embedding or
        head) is no longer the one held (captured graphs read the old address: re-capture)."""
        for mine, layer in zip(self.layers, lm.layers, strict=True):
            mine.refresh(layer)
        self.norm.copy_(lm.norm.weight)
        moved = False
        for attr, w in (("embed", lm.embed_tokens.weight), ("head", head.weight)):
            held = getattr(self, attr)
            if w.dtype == self.dtype:
                moved |= held is not w
                setattr(self, attr, w)
            else:
                held.copy_(w)
        return moved

    def step(self, st, rows: int, attn_len: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """One decode step of slots ``[0, rows)`` of the :class:`~.graph.DecodeState` ``st``:
        writes each layer's k, v at ``cache_pos`` and the fp32 logits (see the module docstring).
        ``cos``/``sin``: (rows, D) of each row's rotary position, in the decode dtype."""
        cache_pos = st.cache_pos[:rows]
        h = self.embed[st.tokens[:rows]]                                    # (B, H)
        mask = None if self.split_k else K.attention_mask(cache_pos, attn_len)
        for i, w in enumerate(self.layers):
            x = K.rmsnorm(h, w.norms["in"], w.eps["in"])
            qkv = x @ w.qkv.t()
            q = K.qk_rope_cache(qkv, w.norms["q"], w.norms["k"], w.eps["q"], cos, sin, st.keys[i], st.values[i],
                                cache_pos, w.q_heads)
            o = self._attention(q, st.keys[i], st.values[i], cache_pos, mask, attn_len, w.scaling)
            h = torch.addmm(h, o, w.o.t())
            x = K.rmsnorm(h, w.norms["post"], w.eps["post"])
            h = torch.addmm(h, K.silu_mul(x @ w.gate_up.t()), w.down.t())
        st.logits[:rows] = (K.rmsnorm(h, self.norm, self.norm_eps) @ self.head.t()).float()

    def _attention(self, q, keys, values, cache_pos, mask, attn_len: int, scale: float) -> torch.Tensor:
        if self.split_k:
            return K.decode_attention_triton(q, keys, values, cache_pos, attn_len, scale)
        return K.decode_attention_ref(q, keys, values, mask, attn_len, scale)
