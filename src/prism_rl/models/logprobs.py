"""Per-token log-probabilities, entropy and the SFT loss, computed in chunks.

The full-vocabulary logits (151,936 wide for Qwen) are the largest activation in training.
These functions run the backbone once, select only the hidden states whose next token is a
target, and apply the output head to ``chunk_size`` of them at a time. In training, each
chunk is checkpointed, so its logits are recomputed in the backward pass instead of being
kept: peak memory is one chunk's logits, not the batch's. ``packed=True`` runs the backbone on
the rows packed into one sequence without padding (``models/packing.py``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .packing import pack_batch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


# cuDNN's fused attention backward returned NaN gradients on an H100 in RL updates (left-padded
# rows; caught by autograd anomaly mode in ScaledDotProductCudnnAttentionBackward0, about one
# step in ten at 512 rows), so training forwards use the other SDPA kernels.
TRAIN_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _backbone(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    on_cuda = inputs["input_ids"].is_cuda
    with sdpa_kernel(TRAIN_SDPA_BACKENDS) if on_cuda else nullcontext():
        # under FSDP2 the root's registered backbone_forward gathers its shards (distributed.shard_model)
        backbone = getattr(model, "backbone_forward", None) or model.model
        return backbone(**inputs, use_cache=False).last_hidden_state


def backbone_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states (B, L, H) of a ``*ForConditionalGeneration`` model's backbone."""
    return _backbone(model, {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch})


def packed_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states (T, H) of ``batch``'s attended tokens in row-major order, computed on
    the rows packed into one sequence: ``backbone_hidden(model, batch)[attention_mask.bool()]``
    up to float rounding, without the padding's compute."""
    return _backbone(model, pack_batch(model, batch))[0]


def _chunk_logprob_entropy(head, h: torch.Tensor, y: torch.Tensor, temperature: float, with_entropy: bool):
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits, dim=-1)
    ent = logz - (probs * logits).sum(-1)
    return logp, ent


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                  chunk_size: int = 2048, with_entropy: bool = False):
    """log p(target) (and entropy) for rows of ``hidden`` (N, H) and ``targets`` (N,), chunked.

    log p(y | h) = (W h / tau)_y - logsumexp(W h / tau);  H(h) = logsumexp(z) - sum softmax(z) z.
    """
    head = model.get_output_embeddings()
    logps, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, en = checkpoint(_chunk_logprob_entropy, head, h, y, temperature, with_entropy,
                                use_reentrant=False)
        else:
            lp, en = _chunk_logprob_entropy(head, h, y, temperature, with_entropy)
        logps.append(lp)
        ents.append(en)
    if not logps:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(logps), torch.cat(ents)


def response_logprobs(model, batch: dict[str, torch.Tensor], response_start: int, *,
                      temperature: float = 1.0, chunk_size: int = 2048, with_entropy: bool = False,
                      packed: bool = False, host_mask: torch.Tensor | None = None):
    """Per-token log-probs (B, R) of the tokens at positions ``[response_start, L)``.

    The row layout is ``[prompt (left-padded) | response (right-padded)]`` with the response
    starting at column ``response_start`` in every row. Positions where the attention mask is 0
    get log-prob 0 (and entropy 0). Token t is scored from the hidden state at t - 1.
    ``packed``: the backbone runs on the rows packed without padding (:func:`packed_hidden`);
    there the hidden state at t - 1 is the packed token just before t's (every row has at least
    one prompt token, so t - 1 is attended). Same values up to float rounding.
    ``host_mask``: the batch's attention mask on the host, when the caller has it there: the
    response tokens are then picked by indices computed on the host and sent without waiting
    for the device's queue (from the device's own mask, finding them makes the host wait).
    """
    ids = batch["input_ids"]
    attended = (batch["attention_mask"] if host_mask is None else host_mask).bool()
    B, L = ids.shape
    R = L - response_start
    rows, cols = attended[:, response_start:].nonzero(as_tuple=True)   # the response tokens, row-major

    def on_device(index: torch.Tensor) -> torch.Tensor:
        return index.to(ids.device, non_blocking=True)   # a no-op for the device's own mask
    if packed:
        flat = (attended.flatten().cumsum(0) - 1).view(B, L)  # packed index of each attended token
        h = packed_hidden(model, batch).index_select(0, on_device(flat[rows, cols + response_start] - 1))
    else:
        h = backbone_hidden(model, batch).reshape(B * L, -1).index_select(0, on_device(rows * L + cols + response_start - 1))
    y = ids.reshape(-1).index_select(0, on_device(rows * L + cols + response_start))
    lp, en = head_logprobs(model, h, y, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    out = on_device(rows * R + cols)
    logp, ent = (torch.zeros(B * R, dtype=torch.float32, device=ids.device).index_put((out,), v).view(B, R)
                 for v in (lp, en))
    return (logp, ent) if with_entropy else logp


def sft_loss(model, batch: dict[str, torch.Tensor], chunk_size: int = 2048) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the label positions (assistant tokens only).

    loss = -(1/N) sum_{t: labels_t != -100} log p(labels_t | x_<t). Returns (loss, N).
    """
    hidden = backbone_hidden(model, batch)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    lp, _ = head_logprobs(model, hidden[:, :-1][keep], labels[keep], chunk_size=chunk_size)
    n = int(keep.sum())
    return (-lp.sum() / max(n, 1)), n


def reference_token_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unchunked log p of every next token (B, L-1) from ``model(**batch).logits``.

    The reference for the chunked paths, in tests/test_logprobs.py and bench/bench_gpu.py.
    """
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    logits = model(**inputs, use_cache=False).logits.float()
    return F.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
