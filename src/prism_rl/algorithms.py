"""Core tensor algorithms of the PRISM recipe (METHOD.md sections 5, 6 and 7).

Every function here is a short, pure tensor function (no module state, no trainer objects):
masked reductions, loss aggregation, group-normalised advantages (GRPO / Dr. GRPO), the
PPO-clip policy loss at token level (GRPO, DAPO with asymmetric and dual clip) and at
sequence level (GSPO), KL estimators, DAPO's overlong shaping, the Bradley-Terry
loss, the Switch / Mixtral load-balancing loss, and the two PRISM-specific pieces of the
adversarial stage: the alignment advantage and the discriminator loss.

Shape conventions
-----------------
``B`` = number of sequences (rollouts), ``T`` = padded response length, ``E`` = number of
experts, ``V`` = vocabulary size.  ``response_mask`` is a bool or float tensor of shape
``(B, T)``; any non-zero entry marks a valid (response) token and counts with weight 1.
Masked-out positions never contribute, even when they hold ``inf`` / ``nan`` (they are
replaced with 0 via ``torch.where`` before any reduction), and an empty selection reduces to
0, never to NaN.

Conventions on gradients: the losses are differentiable w.r.t. ``log_probs`` (policy) or the
scores (discriminator); ``old_log_probs``, ``ref_log_probs`` and advantages are treated as
constants by the caller (pass detached tensors).  Metrics are detached python floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "AGG_MODES",
    "masked_sum",
    "masked_mean",
    "aggregate_loss",
    "group_normalize",
    "grpo_advantages",
    "policy_loss",
    "kl_penalty",
    "overlong_penalty",
    "bradley_terry_loss",
    "load_balancing_loss",
    "align_advantages",
    "discriminator_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# exp() of a log-ratio is taken after clamping it to [-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP]
# (e^20 ~ 4.9e8): keeps fp32 finite; verl clamps the same way.
_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- helpers


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (no NaN in the value nor in the gradient)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _to_1d_long(ids, device) -> torch.Tensor:
    return torch.as_tensor(ids, device=device).reshape(-1).long()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of the valid entries: ``sum(x[m])`` (``dim=None``) or ``sum_d where(m, x, 0)``.

    ``mask`` is broadcast against ``x``; non-zero = valid.  An empty selection sums to 0.
    """
    m = _as_bool(mask)
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the valid entries: ``sum(m * x) / sum(m)``, and 0 where ``sum(m) == 0``.

    ``dim=None`` reduces everything to a scalar; otherwise along ``dim`` (a fully masked row
    gives 0, not NaN).
    """
    m = _as_bool(mask)
    count = m.expand_as(x).to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return _safe_div(masked_sum(x, m, dim), count)


# ----------------------------------------------------------------------------- aggregation


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``loss_mat`` (B, T) over the valid tokens ``mask`` (B, T).

    With ``m`` the 0/1 mask, ``n_i = sum_t m_it`` and ``S = {i : n_i > 0}``:

    - ``"token-mean"``:              ``sum_it m_it L_it / sum_it m_it``
    - ``"seq-mean-token-mean"``:     ``(1/|S|) sum_{i in S} (sum_t m_it L_it / n_i)``
    - ``"seq-mean-token-sum"``:      ``(1/|S|) sum_{i in S} sum_t m_it L_it``
    - ``"seq-mean-token-sum-norm"``: ``sum_it m_it L_it / (B * T')`` with ``T' = norm_len``
      if given, else ``T = mask.shape[-1]`` (Dr. GRPO: a constant normaliser; ``B`` counts
      every row, empty ones included).

    Sequences with no valid token are left out of both seq-mean modes (so padding rows do not
    dilute the loss); an empty batch gives 0.  Unknown ``agg`` raises ``ValueError``.
    """
    m = _as_bool(mask)
    if agg == "token-mean":
        return masked_mean(loss_mat, m)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        reduce = masked_mean if agg == "seq-mean-token-mean" else masked_sum
        per_seq = reduce(loss_mat, m, dim=-1)
        has_tok = m.any(dim=-1)
        return masked_mean(per_seq, has_tok)
    if agg == "seq-mean-token-sum-norm":
        t = m.shape[-1] if norm_len is None else norm_len
        return masked_sum(loss_mat, m) / (m.shape[0] * t)
    raise ValueError(f"unknown loss aggregation mode {agg!r}; expected one of {AGG_MODES}")


# ----------------------------------------------------------------------------- advantages


def group_normalize(
    scores: torch.Tensor,
    group_ids,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group normalisation ``GN(x)_i = (x_i - mean_g) / (std_g + eps)``, ``g`` = group of ``i``.

    ``scores`` (B,), ``group_ids`` (B,) integer labels (tensor or list; any values, any order).
    ``mean_g`` is the group mean and ``std_g`` the unbiased (Bessel, ``/(n_g - 1)``) standard
    deviation.  A group of one has ``mean_g = 0`` and ``std_g = 1`` by definition, so
    ``GN(x) = x / (1 + eps)``.  ``norm_by_std=False`` (Dr. GRPO) gives ``x_i - mean_g`` (a
    singleton group: ``x_i``).  A group whose members are all equal gives exactly 0 (the
    centred value is set to 0 there, so float rounding of the mean cannot leak through
    ``1 / eps``).  Statistics are computed in float64; the result has ``scores``' dtype
    (float32 for integer scores).
    """
    out_dtype = scores.dtype if scores.is_floating_point() else torch.get_default_dtype()
    x = scores.reshape(-1).to(torch.float64)
    gid = _to_1d_long(group_ids, x.device)
    if gid.numel() != x.numel():
        raise ValueError(f"group_ids has {gid.numel()} entries for {x.numel()} scores")
    _, inv = torch.unique(gid, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    n = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(x))
    mean = torch.zeros(k, dtype=x.dtype, device=x.device).index_add(0, inv, x) / n
    gmax = torch.full((k,), -torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amax")
    gmin = torch.full((k,), torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amin")
    single = n == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    centred = x - mean[inv]
    constant = (gmax == gmin) & ~single
    centred = torch.where(constant[inv], torch.zeros_like(centred), centred)
    if not norm_by_std:
        return centred.to(out_dtype).reshape(scores.shape)
    sq = torch.zeros(k, dtype=x.dtype, device=x.device).index_add(0, inv, centred**2)
    std = torch.sqrt(_safe_div(sq, n - 1))
    std = torch.where(single, torch.ones_like(std), std)
    return (centred / (std[inv] + eps)).to(out_dtype).reshape(scores.shape)


def grpo_advantages(
    rewards: torch.Tensor, group_ids, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantage per sequence: ``A_i = (r_i - mean_g) / (std_g + eps)`` (B,).

    Exactly :func:`group_normalize` (unbiased std; singleton group: mean 0, std 1; a group
    with std 0 gives ``A = 0``).  ``norm_by_std=False``: Dr. GRPO, ``A_i = r_i - mean_g``.
    :func:`policy_loss` broadcasts these (B,) advantages over the tokens.
    """
    return group_normalize(rewards, group_ids, norm_by_std=norm_by_std, eps=eps)


# ----------------------------------------------------------------------------- policy loss


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ratio_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip surrogate (GRPO / DAPO at token level, GSPO at sequence level).

    Inputs (B, T): ``log_probs`` (differentiable), ``old_log_probs``, ``response_mask``;
    ``advantages`` (B, T) or (B,) (broadcast over T).  With ``d_t = logp_t - logp_old_t``
    (clamped to [-20, 20] before ``exp``; 0 at masked positions):

    - ``ratio_level="token"``:    ``r_t = exp(d_t)``.
    - ``ratio_level="sequence"`` (GSPO): ``log s_i = (1/n_i) sum_t m_it d_it`` and
      ``r_t = exp(logp_t - sg(logp_t) + sg(log s_i))``: the value of ``r_t`` is ``s_i`` and
      ``grad r_t = s_i * grad logp_t``, so that, aggregated with seq-mean-token-mean, the
      gradient equals that of the sequence objective ``-A_i * s_i``.

    Per token, ``L_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))``; with the
    DAPO dual clip ``clip_c = c > 1``, ``L_t = min(L_t, -A_t c)`` for ``A_t < 0``.  The loss is
    ``aggregate_loss(L, mask, agg, norm_len=norm_len)``.

    Metrics (over valid tokens; 0 when there is none): ``clip_frac`` = fraction where the
    clipped branch is strictly larger (``-A clip(r) > -A r``); ``dual_clip_frac`` (only with
    ``clip_c``) = fraction with ``A < 0`` and ``L_t`` capped at ``-A c``; ``approx_kl`` = mean of
    the k3 estimator of KL(pi_old || pi), ``(r_t - 1) - log r_t`` with the token ratio
    ``r_t = exp(d_t)`` whatever ``ratio_level``; ``ratio_mean`` / ``ratio_max`` / ``ratio_min``
    of the ratio actually used (the sequence ratio for GSPO). Floats, or with ``as_tensors``
    0-dim tensors on the loss's device, which a caller reads once per update instead of
    syncing the host with the device for every metric of every micro-batch.
    """
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected 'token' or 'sequence'")
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_c must be > 1, got {clip_c}")
    m = _as_bool(response_mask)
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    adv = advantages.unsqueeze(-1).expand(m.shape) if advantages.dim() == 1 else advantages
    adv = torch.where(m, adv.to(log_probs.dtype), zero)
    logp = torch.where(m, log_probs, zero)
    d = torch.where(m, log_probs - old_log_probs, zero).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)

    if ratio_level == "token":
        log_ratio = d
    else:
        log_s = masked_mean(d, m, dim=-1).unsqueeze(-1)
        log_ratio = logp - logp.detach() + log_s.detach()
    ratio = torch.exp(log_ratio)

    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(pg1, pg2)
    metrics: dict[str, torch.Tensor] = {}
    if clip_c is not None:
        pg3 = -adv * clip_c
        neg = adv < 0
        metrics["dual_clip_frac"] = masked_mean((neg & (loss_tok > pg3)).to(d.dtype), m).detach()
        loss_tok = torch.where(neg, torch.minimum(loss_tok, pg3), loss_tok)
    loss = aggregate_loss(loss_tok, m, agg, norm_len=norm_len)

    with torch.no_grad():
        r_det = ratio.detach()
        any_valid = m.any()
        inf = torch.full((), float("inf"), dtype=r_det.dtype, device=r_det.device)
        metrics["clip_frac"] = masked_mean((pg2 > pg1).to(d.dtype), m)
        tok_ratio = torch.exp(d.detach())
        metrics["approx_kl"] = masked_mean(tok_ratio - 1.0 - d.detach(), m)
        metrics["ratio_mean"] = masked_mean(r_det, m)
        metrics["ratio_max"] = torch.where(any_valid, torch.where(m, r_det, -inf).amax(), 0.0)
        metrics["ratio_min"] = torch.where(any_valid, torch.where(m, r_det, inf).amin(), 0.0)
    return loss, (metrics if as_tensors else {k: v.item() for k, v in metrics.items()})


# ----------------------------------------------------------------------------- KL


def kl_penalty(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (same shape as the inputs; mask/aggregate after).

    - ``"k1"``: ``logp - ref``
    - ``"k2"``: ``0.5 * (logp - ref)^2``
    - ``"low_var_kl"`` (alias ``"k3"``): ``exp(ref - logp) - (ref - logp) - 1``, with
      ``ref - logp`` clamped to [-20, 20] before ``exp`` and the result clamped to
      [-10, 10] (as verl does).
    """
    if kind == "k1":
        return log_probs - ref_log_probs
    if kind == "k2":
        return 0.5 * (log_probs - ref_log_probs) ** 2
    if kind in ("low_var_kl", "k3"):
        kl = (ref_log_probs - log_probs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (torch.exp(kl) - kl - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'low_var_kl'")


# ----------------------------------------------------------------------------- reward shaping


def overlong_penalty(lengths, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, the additive reward term (B,):

    ``p(L) = min(-(L - (L_max - L_buf)) / L_buf * factor, 0)``.

    0 for ``L <= L_max - L_buf``, linear down to ``-factor`` at ``L = L_max`` and, as stated,
    continuing linearly beyond ``L_max`` (no floor).  ``lengths``: tensor or list of ints.
    """
    if buffer_len <= 0:
        raise ValueError(f"buffer_len must be positive, got {buffer_len}")
    length = torch.as_tensor(lengths)
    length = length.to(length.dtype if length.is_floating_point() else torch.get_default_dtype())
    pen = -(length - (max_len - buffer_len)) / buffer_len * factor
    return torch.clamp(pen, max=0.0)


# ----------------------------------------------------------------------------- discriminator


def bradley_terry_loss(
    s_pos: torch.Tensor, s_neg: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry pairwise loss ``mean_{valid i} -log sigmoid(s_pos_i - s_neg_i)``.

    Uses ``F.logsigmoid`` (stable for large gaps).  ``mask`` (same shape, optional) selects the
    pairs that count; no valid pair gives 0.
    """
    nll = -F.logsigmoid(s_pos - s_neg)
    if mask is None:
        return nll.mean() if nll.numel() else nll.sum()
    return masked_mean(nll, mask)


def load_balancing_loss(
    router_probs_or_logits,
    top_k: int,
    num_experts: int,
    mask: torch.Tensor | None = None,
    *,
    inputs_are_logits: bool = True,
) -> torch.Tensor:
    """Switch / Mixtral auxiliary load-balancing loss, ``E * sum_e f_e * P_e``.

    Input: router outputs of shape (..., E), or a list/tuple of such tensors (one per MoE
    layer, same leading shape; they are pooled as extra tokens).  ``p = softmax(z)`` over the
    E experts when ``inputs_are_logits`` (the default), else the input is taken as ``p``.
    With ``N`` the valid tokens (``mask`` of the leading shape; non-zero = valid):

    - ``f_e = (1/N) sum_tokens 1[e in top_k(p_token)]`` -- the number of routed token-slots
      that go to expert ``e`` per token (``sum_e f_e = top_k``);
    - ``P_e = (1/N) sum_tokens p_token,e`` -- the mean (full, un-renormalised) router
      probability.

    This is exactly ``transformers``' ``load_balancing_loss_func`` (Qwen3-(VL-)MoE, Mixtral),
    which the reference used with coefficient 0.01: perfectly uniform routing gives
    ``top_k`` (divide by ``top_k`` for the per-slot normalisation that gives 1).  The caller
    multiplies by the coefficient.  No valid token gives 0.
    """
    layers = router_probs_or_logits
    if not isinstance(layers, (list, tuple)):
        layers = [layers]
    x = torch.cat([t.reshape(-1, num_experts) for t in layers], dim=0)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32, as transformers does
    p = torch.softmax(x, dim=-1) if inputs_are_logits else x
    if mask is None:
        m = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    else:
        m = _as_bool(mask).reshape(-1).to(p.device).repeat(len(layers))
    top = torch.topk(p, top_k, dim=-1).indices
    slots = torch.zeros_like(p).scatter_(-1, top, 1.0)
    f = masked_mean(slots, m.unsqueeze(-1).expand_as(slots), dim=0)
    P = masked_mean(p, m.unsqueeze(-1).expand_as(p), dim=0)
    return num_experts * (f * P).sum()


# ----------------------------------------------------------------------------- PRISM stage 2


def align_advantages(
    cap_scores: torch.Tensor,
    reason_scores: torch.Tensor,
    valid: torch.Tensor,
    group_ids,
    *,
    alpha: float = 0.5,
    format_penalty: float = 1.5,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PRISM alignment advantage (METHOD.md section 6, step 4), per rollout (B,).

    For each kind ``k`` in {caption, reasoning} and each group ``g`` (the rollouts of one
    prompt), an invalid rollout's score is replaced by ``min_{valid j in g} x_j^k - 1``, or by
    ``-1`` when the group has no valid rollout; valid scores are kept.  Then, with ``F_i = 1``
    for an invalid rollout and 0 otherwise,

        ``A_i = alpha * GN(cap)_i + (1 - alpha) * GN(reason)_i - format_penalty * F_i``

    where ``GN`` is :func:`group_normalize` (unbiased std, ``+ eps``; singleton group: mean 0,
    std 1).  Inputs are constants (no gradient is meant to flow).  ``info`` holds the filled
    scores (``cap_filled``, ``reason_filled``), ``gn_cap``, ``gn_reason`` (B,) and the scalar
    tensors ``invalid_frac`` and ``all_invalid_groups`` (the number of groups without a valid
    rollout).
    """
    v = _as_bool(valid).reshape(-1)
    gid = _to_1d_long(group_ids, v.device)
    _, inv = torch.unique(gid, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    n_valid = torch.zeros(k, dtype=torch.float64, device=v.device).index_add(0, inv, v.to(torch.float64))
    has_valid = n_valid > 0

    def fill(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1)
        inf = torch.tensor(torch.inf, dtype=x.dtype, device=x.device)
        low = torch.full((k,), torch.inf, dtype=x.dtype, device=x.device)
        low = low.scatter_reduce(0, inv, torch.where(v, x, inf), "amin")
        repl = torch.where(has_valid, low - 1.0, -torch.ones_like(low))
        return torch.where(v, x, repl[inv])

    cap, rea = fill(cap_scores), fill(reason_scores)
    gn_cap = group_normalize(cap, inv, eps=eps)
    gn_rea = group_normalize(rea, inv, eps=eps)
    adv = alpha * gn_cap + (1.0 - alpha) * gn_rea - format_penalty * (~v).to(gn_cap.dtype)
    info = {
        "cap_filled": cap.detach(),
        "reason_filled": rea.detach(),
        "gn_cap": gn_cap.detach(),
        "gn_reason": gn_rea.detach(),
        "invalid_frac": (~v).float().mean() if v.numel() else torch.tensor(0.0),
        "all_invalid_groups": (~has_valid).sum(),
    }
    return adv.detach(), info


def discriminator_loss(
    t_cap: torch.Tensor,
    s_cap: torch.Tensor,
    t_reason: torch.Tensor,
    s_reason: torch.Tensor,
    valid: torch.Tensor,
    reg_coef: float = 0.001,
    *,
    num_valid: int | None = None,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PRISM discriminator loss in the adversarial stage (METHOD.md section 6, step 5).

    Inputs (B,), one entry per scored rollout: ``t_*`` the discriminator's score of the
    teacher demonstration of the rollout's prompt (repeated for each rollout of that prompt),
    ``s_*`` its score of the rollout, per segment, 0 for a format-invalid rollout (the score
    the reward step gives it); ``valid`` (B,) the format-valid rollouts ``V``:

        ``loss = (1/|V|) sum_{i in V} -log sigmoid(T_cap_i - S_cap_i)
               + (1/|V|) sum_{i in V} -log sigmoid(T_reason_i - S_reason_i)
               + reg_coef * (1/(4B)) sum_{i=1..B} (T_cap_i^2 + S_cap_i^2 + T_reason_i^2 + S_reason_i^2)``

    The Bradley-Terry terms cover the valid rollouts (0 when there is none); the squared-score
    regulariser covers every scored row, as the reference does, so a step whose rollouts are
    all invalid still bounds the teacher's scores. ``num_valid`` / ``num_rows`` replace
    ``|V|`` / ``B`` when this call holds one group of a larger step: the group losses of a
    step computed that way sum to the step's loss exactly. No MoE auxiliary loss here.

    Metrics (this call's rows; BT metrics over its valid rows, 0 when none): ``cap_acc`` /
    ``reason_acc`` = fraction with T > S, ``cap_gap`` / ``reason_gap`` = mean T - S (the
    training-health gap), ``bt_cap``, ``bt_reason`` (means), ``reg`` (the un-weighted mean
    squared score), ``num_valid``.
    """
    v = _as_bool(valid).reshape(-1)
    n_valid = int(v.sum()) if num_valid is None else num_valid
    n_rows = v.numel() if num_rows is None else num_rows
    nll_cap = torch.where(v, -F.logsigmoid(t_cap - s_cap), torch.zeros_like(t_cap))
    nll_rea = torch.where(v, -F.logsigmoid(t_reason - s_reason), torch.zeros_like(t_reason))
    sq = (torch.stack([t_cap, s_cap, t_reason, s_reason]) ** 2).sum()
    loss = (nll_cap.sum() + nll_rea.sum()) / max(n_valid, 1) + reg_coef * sq / max(4 * n_rows, 1)
    with torch.no_grad():
        metrics = {
            "cap_acc": masked_mean((t_cap > s_cap).float(), v).item(),
            "reason_acc": masked_mean((t_reason > s_reason).float(), v).item(),
            "cap_gap": masked_mean((t_cap - s_cap).float(), v).item(),
            "reason_gap": masked_mean((t_reason - s_reason).float(), v).item(),
            "bt_cap": masked_mean(nll_cap, v).item(),
            "bt_reason": masked_mean(nll_rea, v).item(),
            "reg": (sq / max(4 * v.numel(), 1)).item(),
            "num_valid": float(v.sum()),
        }
    return loss, metrics
