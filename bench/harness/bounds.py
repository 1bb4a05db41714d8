"""FLOP and byte counts of the benchmark's jobs, and the bounds the fractions are taken against.

Counts come from the model's own modules (``Counts.of``), so a shape change needs no formula
change. Matrix products only: a (m x k) @ (k x n) product is 2 m k n FLOPs; norms, activations,
rotary embeddings and the sampler are left out (a few percent at these shapes).

- Training, forward + backward (``train_flops``): 3x the forward (the backward is two products
  per forward product); activation recomputation from gradient checkpointing is *not* counted,
  so MFU is model FLOPs utilisation. Forward FLOPs =
  2 (N_text * tokens + N_head * scored tokens + N_vis * patches + N_merge * patches / 4)
  + 2 L H d sum_i s_i^2   (causal attention, QK^T and AV over s(s+1)/2 pairs ~ s^2/2, 2 FLOPs each)
  + 4 L_v h_v sum_images p^2   (the vision tower's attention is bidirectional over p patches).
  N_text counts the decoder's linear weights, N_head the output head (applied only where a
  log-prob is needed: the response tokens), N_vis the vision blocks and patch embedding, N_merge
  the patch mergers (applied per merged token, 4 patches).
- Rollout (``rollout_bound_s``): prefill of each distinct prompt once at the matmul peak, plus for
  every decode step max(bytes / copy bandwidth, FLOPs / matmul peak), where a step's bytes are the
  bf16 text weights read once plus the KV cache of every live row read once
  (2 L H_kv d x 2 bytes per cached token), and its FLOPs 2 (N_text + N_head) per live row plus
  attention 4 L H d per cached token.
- GRPO step (``rl_step_bound_s``): the rollout bound plus one forward + backward of the batch at
  the matmul peak (old log-probs need no extra forward when the policy is unchanged since sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Counts:
    text_linear: int       # decoder linear weights (q, k, v, o, MLP) of all layers
    head: int              # output head weights (V x hidden; tied to the embedding here)
    vis_block: int         # vision blocks + patch embedding, applied per patch
    vis_merge: int         # patch merger(s), applied per merged token (4 patches)
    text_weight_bytes: int  # every text parameter at 2 bytes (bf16): what one decode step reads
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vis_layers: int
    vis_hidden: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, bf16: 2 * L * H_kv * d * 2 bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @classmethod
    def of(cls, model) -> Counts:
        inner = model.model
        tc, vc = model.config.text_config, model.config.vision_config
        lin = lambda mod: sum(m.weight.numel() for m in mod.modules() if isinstance(m, torch.nn.Linear))
        vis = inner.visual
        merge = lin(vis.merger) + sum(lin(m) for m in getattr(vis, "deepstack_merger_list", []))
        vis_params = {id(p) for p in vis.parameters()}
        text_params = sum(p.numel() for p in model.parameters() if id(p) not in vis_params)
        return cls(text_linear=lin(inner.language_model), head=model.get_output_embeddings().weight.numel(),
                   vis_block=lin(vis) - merge + vis.patch_embed.proj.weight.numel(), vis_merge=merge,
                   text_weight_bytes=2 * text_params, layers=tc.num_hidden_layers, heads=tc.num_attention_heads,
                   kv_heads=tc.num_key_value_heads, head_dim=tc.head_dim, vis_layers=vc.depth, vis_hidden=vc.hidden_size)


def _vision_forward(c: Counts, patches: list[int]) -> float:
    """Forward FLOPs of the vision tower over images of ``patches`` patches each."""
    p = torch.tensor(patches, dtype=torch.float64)
    return float(2 * (c.vis_block * p.sum() + c.vis_merge * p.sum() / 4) + 4 * c.vis_layers * c.vis_hidden * (p**2).sum())


def forward_flops(c: Counts, seq_lens: list[int], scored: int, patches: list[int]) -> float:
    """Forward FLOPs of sequences of ``seq_lens`` tokens, ``scored`` head positions, images of ``patches``."""
    s = torch.tensor(seq_lens, dtype=torch.float64)
    text = 2 * c.text_linear * s.sum() + 2 * c.layers * c.heads * c.head_dim * (s**2).sum()
    return float(text + 2 * c.head * scored) + _vision_forward(c, patches)


def train_flops(c: Counts, seq_lens: list[int], scored: int, patches: list[int]) -> float:
    """Forward + backward model FLOPs: 3 x ``forward_flops`` (recomputation not counted)."""
    return 3 * forward_flops(c, seq_lens, scored, patches)


def decode_seconds(c: Counts, prompt_lens: list[int], resp_lens: list[int], bw: float, peak: float) -> float:
    """Sum over decode steps t = 1 .. max(R)-1 of max(bytes_t / bw, flops_t / peak); row i is live
    while t < R_i and holds P_i + t cached tokens. Token 1 of each row comes from the prefill."""
    P = torch.tensor(prompt_lens, dtype=torch.float64)
    R = torch.tensor(resp_lens, dtype=torch.float64)
    t = torch.arange(1, int(R.max()), dtype=torch.float64)[:, None]        # (steps, 1)
    live = (t < R[None, :]).double()                                        # (steps, rows)
    ctx = ((P[None, :] + t) * live).sum(1)
    rows = live.sum(1)
    bytes_t = c.text_weight_bytes + c.kv_bytes_per_token * ctx
    flops_t = 2 * (c.text_linear + c.head) * rows + 4 * c.layers * c.heads * c.head_dim * ctx
    return float(torch.maximum(bytes_t / bw, flops_t / peak).sum())


def rollout_bound_s(c: Counts, calib: dict, unique_prompt_lens: list[int], unique_patches: list[int],
                    prompt_lens: list[int], resp_lens: list[int]) -> dict:
    """Least time of a rollout: prefill of the distinct prompts at the matmul peak (one head
    position each) + ``decode_seconds``. Returns both parts and their sum (seconds)."""
    peak, bw = calib["matmul_flops_per_s"], calib["copy_bytes_per_s"]
    prefill = forward_flops(c, unique_prompt_lens, len(unique_prompt_lens), unique_patches) / peak
    decode = decode_seconds(c, prompt_lens, resp_lens, bw, peak)
    return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode}


def rl_step_bound_s(c: Counts, calib: dict, unique_prompt_lens: list[int], unique_patches: list[int],
                    prompt_lens: list[int], resp_lens: list[int], row_patches: list[int]) -> float:
    """``rollout_bound_s`` + one forward + backward over every (prompt + response) row at the peak."""
    ro = rollout_bound_s(c, calib, unique_prompt_lens, unique_patches, prompt_lens, resp_lens)["total_s"]
    seqs = [p + r for p, r in zip(prompt_lens, resp_lens)]
    return ro + train_flops(c, seqs, sum(resp_lens), row_patches) / calib["matmul_flops_per_s"]
