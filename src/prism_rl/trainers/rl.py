"""Stage 3: RL with verifiable rewards — GRPO, DAPO and GSPO in one loop.

One step: take ``prompts_per_step`` prompts -> sample ``n`` responses each -> score them with
the verifiable reward (plus DAPO's overlong shaping) -> [DAPO: drop groups whose accuracy
has zero variance and sample more, up to ``max_num_gen_batches`` rounds] -> group-normalised
advantages -> recompute old log-probs -> PPO-clip updates over mini-batches. The presets of
spec section 7 live in ``config.ALGO_PRESETS``. ``ppo_update`` and ``sequence_logprobs`` are
shared with the alignment stage.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .. import algorithms as A
from ..config import AlgoConfig, RLConfig
from ..data.processing import Encoded, LazyPrompts, load_prompts, read_limited
from ..data.records import BadRecords, DataError
from ..eval.evaluate import score_samples, summarize
from ..models.loading import load_policy, special_ids
from ..models.logprobs import response_logprobs
from ..reward import RewardResult, compute_score, load_reward_fn
from ..rollout.base import Rollouts, SamplingParams, concat_rollouts, micro_batch
from ..rollout.hf import HFEngine
from .common import (
    MetricsLogger, autocast_for, build_optimizer, build_scheduler, checkpoint_on_interrupt,
    load_stage_policy, load_trainer_state, save_checkpoint, save_final, set_rng_state, start_run,
)

log = logging.getLogger(__name__)


class PromptStream:
    """Prompts in a seeded per-epoch shuffled order; ``(epoch, pos)`` is its resumable state.

    ``prompts`` is a list of encoded prompts or a ``LazyPrompts`` pool, which encodes a prompt
    when it is drawn. A draw that raises ``DataError`` stops the run, unless ``bad`` is given:
    then the record is counted there once, logged, never drawn again, and the next one is taken.
    """

    def __init__(self, prompts: Sequence[Encoded], seed: int, epoch: int = 0, pos: int = 0,
                 bad: BadRecords | None = None):
        self.prompts, self.seed, self.epoch, self.pos, self.bad = prompts, seed, epoch, pos, bad
        self._skip: set[int] = set()
        self._order = self._perm()

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def take(self, k: int) -> list[Encoded]:
        out = []
        while len(out) < k:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            i = self._order[self.pos]
            self.pos += 1
            if i not in self._skip:
                out.extend(self._draw(i))
        return out

    def _draw(self, i: int) -> list[Encoded]:
        try:
            return [self.prompts[i]]
        except DataError as e:
            if self.bad is None:
                raise
            self._skip.add(i)
            where, _, why = str(e).partition(": ")
            self.bad.add(where, why)
            log.warning("skipping bad record (data.skip_bad): %s", e)
            if len(self._skip) == len(self.prompts):
                raise ValueError(f"no usable prompts: {self.bad.summary()}") from e
            return []

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def make_reward_fn(cfg: RLConfig):
    if cfg.reward.function:
        return load_reward_fn(cfg.reward.function)
    return lambda text, gt: compute_score(text, gt, acc_weight=cfg.reward.acc_weight,
                                          format_weight=cfg.reward.format_weight)


def score(ro: Rollouts, reward_fn, algo: AlgoConfig, max_new_tokens: int) -> dict[str, torch.Tensor]:
    """Rewards (B,), accuracy and format flags; DAPO overlong shaping added to the reward."""
    results: list[RewardResult] = [reward_fn(t, r.ground_truth or "") for t, r in zip(ro.texts, ro.records)]
    reward = torch.tensor([r.score for r in results], dtype=torch.float32)
    out = {"reward": reward, "acc": torch.tensor([r.acc for r in results], dtype=torch.float32),
           "format": torch.tensor([r.format for r in results], dtype=torch.float32)}
    if algo.overlong_buffer > 0:
        pen = A.overlong_penalty(ro.response_lengths.float(), max_new_tokens, algo.overlong_buffer,
                                 algo.overlong_factor)
        out["overlong_penalty"] = pen
        out["reward"] = reward + pen
    return out


def groups_with_variance(group_ids: torch.Tensor, values: torch.Tensor) -> list[int]:
    """Group ids whose ``values`` are not all equal (DAPO dynamic sampling keeps these)."""
    keep = []
    for g in group_ids.unique().tolist():
        v = values[group_ids == g]
        if v.numel() > 1 and bool((v != v[0]).any()):
            keep.append(g)
    return keep


def collect(engine: HFEngine, stream: PromptStream, cfg: RLConfig, reward_fn) -> tuple[Rollouts | None, dict, dict]:
    """Sample and score one training batch (with DAPO's dynamic sampling when enabled).

    Returns ``None`` rollouts when dynamic sampling kept no group in ``max_num_gen_batches``
    rounds (every group all right or all wrong): the step is then skipped and logged.
    """
    r, algo = cfg.rollout, cfg.algo
    params = SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    per_round = r.gen_batch_prompts or r.prompts_per_step
    parts, scores, kept_groups, rounds, offset, seen = [], [], [], 0, 0, 0
    t_gen = t_score = 0.0
    while True:
        rounds += 1
        t = time.time()
        ro = engine.generate(stream.take(per_round), params, group_offset=offset)
        t_gen += time.time() - t
        t = time.time()
        sc = score(ro, reward_fn, algo, r.max_new_tokens)
        t_score += time.time() - t
        offset += per_round
        seen += per_round
        groups = groups_with_variance(ro.group_ids, sc["acc"]) if algo.dynamic_sampling else ro.group_ids.unique().tolist()
        parts.append(ro)
        scores.append(sc)
        kept_groups += groups
        if not algo.dynamic_sampling or len(kept_groups) >= r.prompts_per_step or rounds >= algo.max_num_gen_batches:
            break
    ro = concat_rollouts(parts, engine.pad_id)
    sc = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
    all_stats = {f"all_{k}": float(v.mean()) for k, v in sc.items() if k in ("reward", "acc", "format")}
    kept = set(kept_groups[: r.prompts_per_step])
    rows = [i for i, g in enumerate(ro.group_ids.tolist()) if g in kept]
    stats = {"gen_rounds": rounds, "prompts_sampled": seen, "groups_kept": len(kept),
             "time_rollout_s": t_gen, "time_score_s": t_score, **all_stats}
    if not rows:
        return None, {}, stats
    if len(rows) < len(ro):
        ro = ro.select(rows)
        sc = {k: v[rows] for k, v in sc.items()}
    return ro, sc, stats


def by_length(ro: Rollouts, rows) -> list[int]:
    """``rows`` ordered by response length, then prompt length, so that consecutive
    micro-batches hold similar lengths and ``micro_batch`` trims most padding away (a
    mini-batch's loss is a token- or sequence-weighted sum over its micro-batches, so the
    order within it does not change the update)."""
    resp, prompt = ro.response_mask.sum(1).tolist(), ro.prompt_mask.sum(1).tolist()
    return sorted(rows, key=lambda r: (resp[r], prompt[r]))


def sequence_logprobs(model, ro: Rollouts, micro: int, device, *, temperature: float = 1.0,
                      with_entropy: bool = False, chunk: int = 2048):
    """No-grad per-token log-probs (and entropy) of every rollout row, (B, R), in micro-batches."""
    B, R = ro.response_ids.shape
    logp = torch.zeros(B, R)
    ent = torch.zeros(B, R)
    order = by_length(ro, range(B))
    with torch.no_grad(), autocast_for(device):
        for s in range(0, B, micro):
            rows = order[s:s + micro]
            batch, P, mask = micro_batch(ro, rows)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = response_logprobs(model, batch, P, temperature=temperature, chunk_size=chunk,
                                    with_entropy=with_entropy)
            lp, en = out if with_entropy else (out, None)
            logp[rows, :mask.shape[1]] = lp.float().cpu() * mask
            if en is not None:
                ent[rows, :mask.shape[1]] = en.float().cpu() * mask
    return (logp, ent) if with_entropy else logp


def ppo_update(model, opt, sched, ro: Rollouts, adv: torch.Tensor, old_lp: torch.Tensor, algo: AlgoConfig,
               grad_clip: float, device, *, temperature: float = 1.0, ref_lp: torch.Tensor | None = None,
               seed: int = 0, chunk: int = 2048) -> dict[str, float]:
    """PPO-clip updates: ``ppo_epochs`` passes over ``mini_batches`` shuffled mini-batches.

    Each mini-batch's loss is aggregated exactly as if it were one batch: its micro-batches
    are weighted by their share of the mini-batch's tokens (token-mean) or sequences (the
    seq-mean modes). Returns averaged metrics.
    """
    B = len(ro)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(algo.ppo_epochs):
        perm = torch.randperm(B, generator=g).tolist()
        size = -(-B // algo.mini_batches)
        for mb in [perm[i:i + size] for i in range(0, B, size)]:
            mb = by_length(ro, mb)
            tokens = float(ro.response_mask[mb].sum())
            for s in range(0, len(mb), algo.micro_batch_size):
                rows = mb[s:s + algo.micro_batch_size]
                batch, P, mask = micro_batch(ro, rows)
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = mask.to(device)
                Rm = mask.shape[1]
                with autocast_for(device):
                    out = response_logprobs(model, batch, P, temperature=temperature, chunk_size=chunk,
                                            with_entropy=algo.entropy_coef > 0)
                lp, ent = out if algo.entropy_coef > 0 else (out, None)
                loss, m = A.policy_loss(
                    lp, old_lp[rows, :Rm].to(device), adv[rows].to(device), mask, ratio_level=algo.ratio_level,
                    clip_low=algo.clip_low, clip_high=algo.clip_high, clip_c=algo.clip_c, agg=algo.agg,
                    norm_len=ro.response_ids.shape[1])
                if algo.kl_coef > 0 and ref_lp is not None:
                    kl = A.masked_mean(A.kl_penalty(lp, ref_lp[rows, :Rm].to(device), "low_var_kl"), mask)
                    loss = loss + algo.kl_coef * kl
                    m["kl"] = float(kl)
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * A.masked_mean(ent, mask)
                w = float(mask.sum()) / tokens if algo.agg == "token-mean" else len(rows) / len(mb)
                (loss * w).backward()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * w
                sums["pg_loss"] = sums.get("pg_loss", 0.0) + float(loss.detach()) * w
            norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
            if math.isfinite(norm):
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
                opt.step()
            else:  # one NaN/inf gradient would make every weight NaN: skip the step, count it
                sums["nonfinite_grad_skips"] = sums.get("nonfinite_grad_skips", 0.0) + 1
                log.warning("non-finite gradient norm (%s) in a PPO mini-batch of %d rows: step skipped", norm, len(mb))
            sched.step()
            opt.zero_grad(set_to_none=True)
            n_updates += 1
    skips = int(sums.pop("nonfinite_grad_skips", 0))
    norm_sum = sums.pop("grad_norm", None)  # averaged over the applied updates only
    out = {k: v / n_updates for k, v in sums.items()} | {"updates": n_updates, "nonfinite_grad_skips": skips}
    if norm_sum is not None:
        out["grad_norm"] = norm_sum / (n_updates - skips)
    return out


def nonfinite_streak(streak: int, upd: dict, step: int, where) -> int:
    """Count RL steps in a row whose every update was skipped for a non-finite gradient; three
    mean the policy or its inputs are broken (not one rare batch), so the run stops."""
    streak = streak + 1 if upd["nonfinite_grad_skips"] == upd["updates"] else 0
    if streak >= 3:
        raise FloatingPointError(f"{where}: every update of steps {step - 2}..{step} had a non-finite "
                                 "gradient (steps skipped); the policy or its inputs hold inf/NaN")
    return streak


def greedy_eval(model, processor, prompts: list[Encoded], max_new_tokens: int, batch_size: int = 64) -> dict:
    """Greedy accuracy / format / length on ``prompts`` with the built-in reward."""
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    return summarize(score_samples(HFEngine(model, processor), prompts, params, batch_size))


def stage_prompts(path: str, processor, eos: int, cfg, limit: int | None, bad: BadRecords) -> list[Encoded]:
    """Prompts of an RL-style stage, encoded now, with the stage's prompt limit and bad-record policy."""
    return load_prompts(path, processor, eos_id=eos, max_length=cfg.data.max_prompt_length, limit=limit,
                        skip_bad=cfg.data.skip_bad, bad=bad)


def stage_prompt_pool(cfg, processor, bad: BadRecords) -> LazyPrompts:
    """The training prompts of an RL-style stage as a lazily encoded pool (images checked now)."""
    records = read_limited(cfg.data.train, cfg.data.limit, cfg.data.skip_bad, bad)
    pool = LazyPrompts(records, processor, cfg.data.max_prompt_length).check_images(cfg.data.skip_bad, bad)
    if not len(pool):
        raise ValueError(f"{cfg.data.train}: no usable prompts ({bad.summary()})")
    return pool


def train_rl(cfg: RLConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run RLVR with ``cfg.algo``; returns the folder of the final policy."""
    out, device, ckpt = start_run(cfg, resume)
    model, processor = load_stage_policy(cfg, device, ckpt)
    eos, _ = special_ids(processor)
    bad = BadRecords()
    prompts = stage_prompt_pool(cfg, processor, bad)
    eval_prompts = stage_prompts(cfg.data.eval, processor, eos, cfg, cfg.train.eval_limit, bad) \
        if cfg.data.eval and cfg.train.eval_every else []
    ref = None
    if cfg.algo.kl_coef > 0:
        ref, _ = load_policy(cfg.model, device, trainable=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    updates_per_step = cfg.algo.ppo_epochs * cfg.algo.mini_batches
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps * updates_per_step)
    step, stream_state, bad_steps = 0, {"epoch": 0, "pos": 0}, 0
    if ckpt is not None:
        st = load_trainer_state(ckpt)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        step, stream_state = st["step"], st["stream"]
    stream = PromptStream(prompts, cfg.train.seed, **stream_state, bad=bad if cfg.data.skip_bad else None)
    engine = HFEngine(model, processor, device, cache_implementation=cfg.rollout.cache_implementation)
    reward_fn = make_reward_fn(cfg)
    logger = MetricsLogger(out)
    logger.log(step, {"event": "start", "algo": cfg.algo.name, "prompts": len(prompts), "bad_records": bad.count,
                      "resumed_from": str(ckpt) if ckpt else None})
    bar = tqdm(total=cfg.train.steps, initial=step, desc=f"rl-{cfg.algo.name}", dynamic_ncols=True)
    halt = min(cfg.train.steps, halt_at_step if halt_at_step is not None else cfg.train.steps)

    def state() -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "stream": stream.state()}

    def save() -> Path:
        return save_checkpoint(out, step, {"": model}, processor, state())

    with checkpoint_on_interrupt(save, (bar, logger)):
        while step < halt:
            t0 = time.time()
            ro, sc, stats = collect(engine, stream, cfg, reward_fn)
            if ro is None:
                step += 1
                logger.log(step, {**stats, "skipped": 1})
                bar.update(1)
                continue
            adv = A.grpo_advantages(sc["reward"], ro.group_ids, norm_by_std=cfg.algo.norm_by_std, eps=cfg.algo.adv_eps)
            t = time.time()
            old_lp, ent = sequence_logprobs(model, ro, cfg.algo.micro_batch_size, device,
                                            temperature=cfg.rollout.temperature, with_entropy=True,
                                            chunk=cfg.train.logprob_chunk)
            ref_lp = sequence_logprobs(ref, ro, cfg.algo.micro_batch_size, device,
                                       temperature=cfg.rollout.temperature) if ref is not None else None
            t_lp = time.time() - t
            t = time.time()
            upd = ppo_update(model, opt, sched, ro, adv, old_lp, cfg.algo, cfg.optim.grad_clip, device,
                             temperature=cfg.rollout.temperature, ref_lp=ref_lp, seed=cfg.train.seed + step,
                             chunk=cfg.train.logprob_chunk)
            t_upd = time.time() - t
            step += 1
            bad_steps = nonfinite_streak(bad_steps, upd, step, out)
            lengths = ro.response_lengths.float()
            n_tok = float(ro.response_mask.sum() + ro.prompt_mask.sum())
            wall = time.time() - t0
            metrics = {**stats, **upd, "reward": float(sc["reward"].mean()), "acc": float(sc["acc"].mean()),
                       "format": float(sc["format"].mean()), "resp_len_mean": float(lengths.mean()),
                       "resp_len_max": float(lengths.max()),
                       "truncated_frac": sum(f == "length" for f in ro.finish_reasons) / len(ro),
                       "entropy": float(A.masked_mean(ent, ro.response_mask)), "adv_abs_mean": float(adv.abs().mean()),
                       "time_logprob_s": t_lp, "time_update_s": t_upd, "time_step_s": wall,
                       "tokens_per_s": n_tok / max(wall, 1e-9), "lr": sched.get_last_lr()[0]}
            if eval_prompts and step % cfg.train.eval_every == 0:
                ev = greedy_eval(model, processor, eval_prompts, cfg.rollout.max_new_tokens)
                metrics.update({"eval_acc": ev["overall"]["accuracy"], "eval_format": ev["overall"]["format_rate"]})
            if step % cfg.train.log_every == 0 or step == halt:
                logger.log(step, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['acc']:.2f}")
            bar.update(1)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                save()
    if step < cfg.train.steps:
        return save()
    final = save_final(out / "final", model, processor)
    (out / "summary.json").write_text(json.dumps({"steps": step, "algo": cfg.algo.name, "bad_records": bad.count,
                                                  "bad_record_reasons": bad.reasons}, indent=2))
    return final
