"""The policy side of RL and alignment: log-probs of rollouts and the PPO-clip update.

Both policy-gradient stages (``trainers/rl.py`` and ``trainers/align.py``) sample rollouts,
compute advantages their own way, then call the same two functions here:

- :func:`sequence_logprobs`: no-grad per-token log-probs (and entropy) of every rollout row,
  the "old" log-probs of the PPO ratio (and of the frozen reference policy for a KL term);
- :func:`ppo_update`: ``ppo_epochs`` passes over shuffled mini-batches, each one optimizer
  step whose loss is exactly the loss of that mini-batch as one batch, computed in
  length-sorted micro-batches; a non-finite gradient skips its optimizer step.

Micro-batches are ``micro_batch_size`` padded rows, or, with ``micro_token_budget``, as many
rows as fit in that many tokens, packed into one sequence without padding
(``models/packing.py``). When the update is exactly on-policy (:func:`on_policy`: one epoch,
one mini-batch) the trainers skip the separate old-log-prob pass: ``ppo_update`` takes the
old log-probs from its own forward, detached (as verl does).

:class:`NonfiniteGuard` stops a run with no finite update three steps in a row. The
role matches EasyR1's data-parallel actor; the loss formulas live in ``algorithms.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch

from . import algorithms as A
from . import distributed as D
from .config import PPOConfig
from .models.loading import autocast_for
from .models.logprobs import response_logprobs
from .models.shared_vision import shared_vision
from .rollout.base import NonfiniteLogits, Rollouts, micro_batch

log = logging.getLogger(__name__)


def by_length(ro: Rollouts, rows: Iterable[int]) -> list[int]:
    """``rows`` ordered by response length, then prompt length, so that consecutive
    micro-batches hold similar lengths and ``micro_batch`` trims most padding away (a
    mini-batch's loss is a token- or sequence-weighted sum over its micro-batches, so the
    order within it does not change the update)."""
    resp, prompt = ro.response_mask.sum(1).tolist(), ro.prompt_mask.sum(1).tolist()
    return sorted(rows, key=lambda r: (resp[r], prompt[r]))


def split_micro(ro: Rollouts, rows: list[int], size: int, token_budget: int | None = None) -> list[list[int]]:
    """Consecutive runs of ``rows`` (in the given order): ``size`` rows each; or, with a
    ``token_budget``, each run the longest prefix of the remaining rows whose attended tokens
    (prompt + response, no padding) sum to at most the budget - a row longer than the budget
    makes a run of its own."""
    if token_budget is None:
        return [rows[s:s + size] for s in range(0, len(rows), size)]
    tokens = (ro.prompt_mask.sum(1) + ro.response_mask.sum(1)).tolist()
    runs: list[list[int]] = []
    used = 0
    for r in rows:
        if runs and used + tokens[r] <= token_budget:
            runs[-1].append(r)
            used += tokens[r]
        else:
            runs.append([r])
            used = tokens[r]
    return runs


def same_count(runs: list[list[int]]) -> list[tuple[list[int], bool]]:
    """``(rows, real)`` for each micro-batch, padded with repeats of the last one (``real=False``)
    up to the largest count on any rank. Under FSDP2 every forward and backward is collective,
    so the ranks must run the same number of them; a repeat's loss is multiplied by 0 (its
    gradient adds nothing) and its metrics are dropped. One process: ``runs`` unchanged."""
    n = int(D.all_reduce_max(len(runs))[0]) if D.is_distributed() else len(runs)
    return [(r, True) for r in runs] + [(runs[-1], False)] * (n - len(runs))


def on_policy(ppo: PPOConfig) -> bool:
    """True when every forward of the update sees the weights that the old log-probs would be
    computed with: one PPO epoch of one mini-batch, so no optimizer step comes between them.
    Then old log-probs = the update forward's own log-probs, detached (ratio exactly 1)."""
    return ppo.ppo_epochs == 1 and ppo.mini_batches == 1


def sequence_logprobs(model, ro: Rollouts, micro: int, device: torch.device, *, temperature: float = 1.0,
                      with_entropy: bool = False, chunk: int = 2048, token_budget: int | None = None,
                      share_vision: bool = True):
    """No-grad per-token log-probs (and entropy) of every rollout row, (B, R), 0 off the
    response; computed in length-sorted micro-batches of ``micro`` padded rows, or packed to
    ``token_budget`` tokens (:func:`split_micro`). With ``share_vision`` the vision tower runs
    once per distinct image of the batch (``models/shared_vision.py``), not once per row."""
    B, R = ro.response_ids.shape
    logp = torch.zeros(B, R, device=device)   # filled on the device, brought to the host once
    ent = torch.zeros(B, R, device=device)
    with torch.no_grad(), autocast_for(device):
        shared = shared_vision(model, ro, list(range(B)), device) if share_vision else None
        for rows, real in same_count(split_micro(ro, by_length(ro, range(B)), micro, token_budget)):
            batch, P, mask, host_mask, _ = _to_device(ro, rows, device)
            with shared.serving(rows) if shared else nullcontext():
                out = response_logprobs(model, batch, P, temperature=temperature, chunk_size=chunk,
                                        with_entropy=with_entropy, packed=token_budget is not None,
                                        host_mask=host_mask)
            if not real:  # distributed: a repeat that keeps the ranks' forward counts equal
                continue
            lp, en = out if with_entropy else (out, None)
            idx = torch.tensor(rows).to(device, non_blocking=True)
            logp[idx, :mask.shape[1]] = lp.float() * mask
            if en is not None:
                ent[idx, :mask.shape[1]] = en.float() * mask
    D.reshard(model)  # distributed: free the root's gathered weights before the update's forwards
    return (logp.cpu(), ent.cpu()) if with_entropy else logp.cpu()


def _to_device(ro: Rollouts, rows: list[int], device: torch.device):
    """The micro-batch of ``rows`` on ``device`` (copies that do not wait for the device's queued
    work: host-to-device from ordinary memory is staged at once), its response start, response
    mask on the device, attention mask kept on the host (for host-side token selection), and
    response token count."""
    batch, P, mask = micro_batch(ro, rows)
    host_mask, n_tokens = batch["attention_mask"], float(mask.sum())
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch, P, mask.to(device, non_blocking=True), host_mask, n_tokens


def _micro_loss(model, ro: Rollouts, rows: list[int], adv: torch.Tensor, old_lp: torch.Tensor | None, ppo: PPOConfig,
                device: torch.device, temperature: float, chunk: int, kl_coef: float,
                ref_lp: torch.Tensor | None, shared=None) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor]]:
    """(policy loss aggregated as ``ppo.agg`` says, token-mean regulariser, response token count,
    metrics) of one micro-batch. The regulariser is ``kl_coef * KL - entropy_coef * H`` averaged
    over the micro-batch's tokens: a token mean whatever ``agg``, so the caller weighs it by
    token share. ``old_lp=None``: the old log-probs are this forward's own, detached; the
    metrics then add ``entropy_sum``, the summed entropy of the micro-batch's response tokens.
    ``shared``: the mini-batch's :class:`~prism_rl.models.shared_vision.SharedVision`, if any.
    The metrics are 0-dim tensors on the device and the count comes from the host's mask, so
    nothing here makes the host wait for the device (the caller reads the metrics once)."""
    batch, P, mask, host_mask, n_tokens = _to_device(ro, rows, device)
    Rm = mask.shape[1]
    want_ent = ppo.entropy_coef > 0 or old_lp is None
    with autocast_for(device), shared.serving(rows) if shared else nullcontext():
        out = response_logprobs(model, batch, P, temperature=temperature, chunk_size=chunk,
                                with_entropy=want_ent, packed=ppo.micro_token_budget is not None, host_mask=host_mask)
    lp, ent = out if want_ent else (out, None)
    old = lp.detach() if old_lp is None else old_lp[rows, :Rm].to(device, non_blocking=True)
    loss, m = A.policy_loss(
        lp, old, adv[rows].to(device, non_blocking=True), mask, ratio_level=ppo.ratio_level,
        clip_low=ppo.clip_low, clip_high=ppo.clip_high, clip_c=ppo.clip_c, agg=ppo.agg,
        norm_len=ro.response_ids.shape[1], as_tensors=True)
    reg = lp.new_zeros(())
    if kl_coef > 0 and ref_lp is not None:
        kl = A.masked_mean(A.kl_penalty(lp, ref_lp[rows, :Rm].to(device, non_blocking=True), "low_var_kl"), mask)
        reg = reg + kl_coef * kl
        m["kl"] = kl.detach()
    if ppo.entropy_coef > 0:
        reg = reg - ppo.entropy_coef * A.masked_mean(ent, mask)
    if old_lp is None:
        m["entropy_sum"] = (ent.detach() * mask).sum()
    return loss, reg, n_tokens, m


def ppo_update(model, opt: torch.optim.Optimizer, sched, ro: Rollouts, adv: torch.Tensor, old_lp: torch.Tensor | None,
               ppo: PPOConfig, grad_clip: float, device: torch.device, *, temperature: float = 1.0,
               kl_coef: float = 0.0, ref_lp: torch.Tensor | None = None, seed: int = 0,
               chunk: int = 2048, share_vision: bool = True) -> dict[str, float]:
    """PPO-clip updates: ``ppo_epochs`` passes over ``mini_batches`` shuffled mini-batches.

    Each mini-batch's loss is aggregated exactly as if it were one batch: its micro-batches
    (:func:`split_micro`) are weighted by their share of the mini-batch's tokens (token-mean)
    or sequences (the seq-mean modes). With ``kl_coef > 0`` and ``ref_lp`` the loss adds
    ``kl_coef * token-mean(low-var KL(pi || pi_ref))`` and with ``entropy_coef > 0`` it
    subtracts ``entropy_coef * token-mean(H)``, token means over the mini-batch whatever
    ``agg`` (so weighted by token share). ``pg_loss`` is that total loss; metrics are averaged
    over updates.

    ``old_lp=None`` (only when :func:`on_policy`): the old log-probs are each micro-batch
    forward's own, detached, which equal a separate pass's (the weights have not moved yet),
    so the separate pass is saved; the metrics then add ``entropy`` = token-mean entropy over
    every response token, what ``sequence_logprobs(..., with_entropy=True)`` would give.

    Under torchrun each rank holds its share of the rollouts (whole groups); a mini-batch is the
    union of the ranks' k-th mini-batches, and its token (or row) count is summed over ranks,
    so the loss is the global one: with one mini-batch, N processes give the 1-process update.

    ``share_vision``: the vision tower runs once per distinct image of a mini-batch (a GRPO
    group's n rows share one), its features shared by the micro-batches and its gradient
    back-propagated once, summed over the uses (``models/shared_vision.py``); same update.
    """
    if old_lp is None and not on_policy(ppo):
        raise ValueError(f"old_lp=None (old log-probs from the update's own forward) needs one PPO epoch and one "
                         f"mini-batch, not ppo_epochs={ppo.ppo_epochs}, mini_batches={ppo.mini_batches}")
    B = len(ro)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    entropy_sum = 0.0
    n_updates = 0
    for _ in range(ppo.ppo_epochs):
        perm = torch.randperm(B, generator=g).tolist()
        size = -(-B // ppo.mini_batches)
        for mb in [perm[i:i + size] for i in range(0, B, size)]:
            mb = by_length(ro, mb)
            tokens, n_rows = D.all_reduce_sum(float(ro.response_mask[mb].sum()), len(mb))  # global normalisers
            shared = shared_vision(model, ro, mb, device) if share_vision else None
            for rows, real in same_count(split_micro(ro, mb, ppo.micro_batch_size, ppo.micro_token_budget)):
                loss, reg, n_tok, m = _micro_loss(model, ro, rows, adv, old_lp, ppo, device, temperature, chunk,
                                                  kl_coef, ref_lp, shared)
                w_tok = n_tok / tokens
                w = w_tok if ppo.agg == "token-mean" else len(rows) / n_rows
                total = loss * w + reg * w_tok
                (total * (D.grad_scale() if real else 0.0)).backward()  # FSDP2 averages: scale to the sum
                if not real:  # distributed: a repeat that keeps the ranks' backward counts equal
                    continue
                entropy_sum = entropy_sum + m.pop("entropy_sum", 0.0)   # device tensors: read once, below
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v * (w_tok if k == "kl" else w)
                sums["pg_loss"] = sums.get("pg_loss", 0.0) + total.detach()
            if shared is not None:
                shared.backward()   # the tower's gradient, summed over every row that showed each image
            _apply(params, opt, sched, grad_clip, sums, len(mb))
            n_updates += 1
    sums = {k: float(v) for k, v in sums.items()}   # the host's one read of the update's metrics
    entropy_sum = float(entropy_sum)
    skips = int(sums.pop("nonfinite_grad_skips", 0))
    norm_sum = sums.pop("grad_norm", None)  # averaged over the applied updates only
    sums = _global_sums(sums)
    entropy_sum, resp_tokens = D.all_reduce_sum(entropy_sum, float(ro.response_mask.sum()))
    out = {k: v / n_updates for k, v in sums.items()} | {"updates": n_updates, "nonfinite_grad_skips": skips}
    if norm_sum is not None:
        out["grad_norm"] = norm_sum / (n_updates - skips)
    if old_lp is None:
        out["entropy"] = entropy_sum / max(resp_tokens, 1.0)
    return out


def _global_sums(sums: dict[str, float]) -> dict[str, float]:
    """The metric sums over all ranks: each rank's terms carry global weights (its share of the
    mini-batch's tokens or rows), so their sum over ranks is the 1-process value."""
    keys = sorted(sums)
    return dict(zip(keys, D.all_reduce_sum(*(sums[k] for k in keys)))) if D.is_distributed() else sums


def _apply(params: list[torch.nn.Parameter], opt, sched, grad_clip: float, sums: dict[str, float], rows: int) -> None:
    """Clip and apply the accumulated gradient, or skip the step when its norm is not finite."""
    norm = D.clip_grad_norm(params, grad_clip)  # distributed: the norm over all shards
    if math.isfinite(norm):
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
        opt.step()
    else:  # one NaN/inf gradient would make every weight NaN: skip the step, count it
        sums["nonfinite_grad_skips"] = sums.get("nonfinite_grad_skips", 0.0) + 1
        log.warning("non-finite gradient norm (%s) in a PPO mini-batch of %d rows: step skipped", norm, rows)
    sched.step()
    opt.zero_grad(set_to_none=True)


class NonfiniteGuard:
    """Stops a run that could not take a finite optimizer step ``limit`` steps in a row: that
    means the model or its inputs are broken, not one rare batch. RL and alignment count steps
    whose every PPO update was skipped (:meth:`check`); SFT and the warm-up skip an optimizer
    step whose loss or gradient norm is not finite and count those (:meth:`step_ok`)."""

    def __init__(self, where: object, limit: int = 3):
        self.where, self.limit, self.streak = where, limit, 0

    def check(self, upd: dict, step: int) -> None:
        """Count ``step`` (its ``ppo_update`` metrics) in the streak; raise at the limit."""
        self._count(upd["nonfinite_grad_skips"] == upd["updates"], step,
                    "every update of steps {a}..{b} had a non-finite gradient (steps skipped); "
                    "the policy or its inputs hold inf/NaN")

    def step_ok(self, step: int, loss: float, grad_norm: float | torch.Tensor) -> bool:
        """Whether ``step``'s optimizer step may be applied: ``loss`` and ``grad_norm`` finite.
        A non-finite one is counted in the streak (logged; :class:`FloatingPointError` at the
        limit) and its step should be skipped, since one NaN gradient turns every weight NaN."""
        norm = float(grad_norm)
        bad = not (math.isfinite(loss) and math.isfinite(norm))
        if bad:
            log.warning("%s: step %d: non-finite loss (%s) or gradient norm (%s): optimizer step skipped",
                        self.where, step, loss, norm)
        self._count(bad, step, "the loss or gradient norm of steps {a}..{b} was not finite (optimizer steps "
                               "skipped); the model or its data hold inf/NaN, or the learning rate is too high")
        return not bad

    def rollouts(self, sample, step: int):
        """``sample()`` (a step's rollouts), or None when the engine found NaN/inf logits
        (:class:`~prism_rl.rollout.base.NonfiniteLogits`) on this or any rank: the step is then
        skipped (logged with the engine's message) and counted in the streak, so every rank skips
        it together and the limit stops a policy that has gone bad for good."""
        err = None
        try:
            ro = sample()
        except NonfiniteLogits as e:
            err, ro = e, None
        (failed,) = D.all_reduce_sum(int(err is not None))
        if not failed:
            return ro
        why = str(err) if err is not None else "on another rank"
        log.warning("%s: step %d: the rollouts' logits were NaN/inf (%s): step skipped", self.where, step, why)
        self._count(True, step, "the rollouts of steps {a}..{b} had NaN/inf logits (steps skipped), the last: "
                    + why.replace("{", "{{").replace("}", "}}"))
        return None

    def _count(self, bad: bool, step: int, message: str) -> None:
        self.streak = self.streak + 1 if bad else 0
        if self.streak >= self.limit:
            raise FloatingPointError(f"{self.where}: " + message.format(a=step - self.limit + 1, b=step))
