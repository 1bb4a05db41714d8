"""Padding-free forwards: the rows of a padded batch packed into one sequence.

A padded micro-batch of B rows costs B x L_max token-forwards, however short most rows are.
Packing concatenates only the attended tokens of every row into one row of T = sum of row
lengths tokens and keeps the rows apart with two things:

- position ids passed explicitly, (4, 1, T): row 0 the plain text positions 0..n_r - 1 of
  each row r (the form transformers reads as "packed" for varlen flash attention), rows 1-3
  each row's own Qwen3-VL M-RoPE ids, exactly as the padded forward computes them
  (``mrope.mrope_position_ids``), so a row's image tokens keep their 2-D positions;
- attention restricted to each row: a block-diagonal causal mask, (1, 1, T, T), boolean for
  ``sdpa`` and additive for ``eager`` (transformers uses a 4-D mask as given); with
  ``flash_attention_2`` no mask, the varlen kernel reads row boundaries off the text positions.

With ``sdpa`` the attention still computes T x T scores (the mask removes the cross-row ones,
the kernel does not skip them), so a token budget of a few rows' length is where packing pays.
"""

from __future__ import annotations

import torch

from .mrope import mrope_position_ids

MASKED_IMPLEMENTATIONS = ("sdpa", "eager")
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def row_segments(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row index of every attended token of ``attention_mask`` (B, L), in row-major order: (T,)."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
    return rows.repeat_interleave(attention_mask.bool().sum(1))


def block_causal_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Attention mask (1, 1, T, T) of packed rows: token i may attend token j iff
    segments[i] == segments[j] and j <= i. Boolean (True = attend) for sdpa; additive
    (0 or the dtype's minimum) for eager; None for the varlen flash kernels."""
    if implementation in VARLEN_IMPLEMENTATIONS:
        return None
    if implementation not in MASKED_IMPLEMENTATIONS:
        raise ValueError(f"packed micro-batches need attn_implementation sdpa, eager or flash_attention_2, "
                         f"not '{implementation}'")
    T = segments.shape[0]
    same = segments[:, None] == segments[None, :]
    allowed = (same & torch.ones(T, T, dtype=torch.bool, device=segments.device).tril())[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_position_ids(batch: dict[str, torch.Tensor], image_token_id: int, spatial_merge_size: int) -> torch.Tensor:
    """Position ids (4, 1, T) of ``batch``'s attended tokens packed in row-major order.

    Row 0: text position cumsum(mask) - 1 within each row (0 at each row's first token);
    rows 1-3: the row's M-RoPE (t, h, w) ids of ``mrope_position_ids`` on the padded batch,
    read at the attended tokens - the ids the padded forward gives the same tokens.
    """
    mask = batch["attention_mask"].bool()
    mrope = mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                               image_token_id, spatial_merge_size)
    text = batch["attention_mask"].long().cumsum(1) - 1
    return torch.cat([text[mask][None], mrope[:, mask]])[:, None, :]


def attn_implementation(model) -> str:
    """The text model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", "sdpa")


def pack_batch(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone inputs for ``batch``'s rows packed into one row without padding.

    Tokens are ``input_ids[attention_mask]`` (1, T), rows one after another, each row's tokens
    in order; images stay as they are (their patches are in row order already). The hidden
    state of packed token k is that of the k-th attended token of the padded batch (row-major).
    """
    mask = batch["attention_mask"].bool()
    cfg = model.config
    positions = packed_position_ids(batch, cfg.image_token_id, cfg.vision_config.spatial_merge_size)
    dtype = model.get_input_embeddings().weight.dtype
    out = {"input_ids": batch["input_ids"][mask][None], "position_ids": positions,
           "attention_mask": block_causal_mask(row_segments(mask), attn_implementation(model), dtype)}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][mask][None]
    for key in ("pixel_values", "image_grid_thw"):
        if batch.get(key) is not None:
            out[key] = batch[key]
    return out
