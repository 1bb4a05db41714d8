"""Stage 2: adversarial on-policy distillation against the MoE discriminator (spec section 6).

One step:
1. sample ``n`` rollouts for each of ``prompts_per_step`` prompts (temperature 1.0);
2. score each rollout's caption and reasoning segments with the discriminator as it is
   *before* this step's update (no grad) - these scores are the reward;
3. recompute the old log-probs;
4. A = alpha GN(cap) + (1 - alpha) GN(reason) - format_penalty F, with invalid rollouts'
   scores replaced by (lowest valid score in the group - 1), or -1 if none is valid;
5. update the discriminator: the prompt's teacher demonstration is the positive for each of
   its rollouts; L_D = mean_valid -log sigma(T_cap - S_cap) + mean_valid -log sigma(T_reason -
   S_reason) + reg_coef mean(score^2); computed group by group (one prompt and its rollouts
   per backward) with weights v_g / V, which gives exactly the full-batch gradient;
6. update the policy with PPO-clip (no KL, no entropy bonus).
Health: the teacher-minus-student gap per segment (the reference run settles near 4.5).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import algorithms as A
from ..config import AlignConfig
from ..data.records import BadRecords
from ..models.discriminator import Discriminator, score_segments, score_texts
from ..reward import compute_score
from ..rollout.base import Rollouts, SamplingParams
from ..rollout.hf import HFEngine
from .common import (
    MetricsLogger, build_optimizer, build_scheduler, checkpoint_on_interrupt, load_stage_policy, load_trainer_state,
    save_checkpoint, save_final, set_rng_state, start_run,
)
from .rl import PromptStream, nonfinite_streak, ppo_update, sequence_logprobs, stage_prompt_pool

log = logging.getLogger(__name__)


def row_prompts(prompts, n: int):
    """The encoded prompt of each rollout row (prompts repeated ``n`` times, in row order)."""
    return [p for p in prompts for _ in range(n)]


@torch.no_grad()
def reward_scores(disc: Discriminator, processor, prompts, ro: Rollouts, n: int, batch_size: int):
    """Segment scores of every rollout from the frozen (eval-mode) discriminator."""
    was = disc.training
    disc.eval()
    sc = score_segments(disc, processor, row_prompts(prompts, n), ro.texts, batch_size=batch_size)
    disc.train(was)
    return sc


def discriminator_step(disc: Discriminator, opt, sched, processor, prompts, ro: Rollouts, valid: torch.Tensor,
                       n: int, cfg: AlignConfig) -> dict:
    """One discriminator update against the teachers of this step's prompts (spec step 5)."""
    V = int(valid.sum())
    if V == 0:
        return {"disc_skipped": 1.0}
    params = [p for p in disc.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    for gi, prompt in enumerate(prompts):
        rows = [r for r in range(gi * n, (gi + 1) * n) if bool(valid[r])]
        if not rows:
            continue
        rec = prompt.record
        t = score_texts(disc, processor, [prompt], [rec.extra["teacher_caption"]], [rec.extra["teacher_cot"]],
                        batch_size=cfg.disc.batch_size)
        s = score_segments(disc, processor, [prompt] * len(rows), [ro.texts[r] for r in rows],
                           batch_size=cfg.disc.batch_size)
        k = len(rows)
        loss, m = A.discriminator_loss(t.cap.expand(k), s.cap, t.reason.expand(k), s.reason,
                                       torch.ones(k, dtype=torch.bool, device=s.cap.device),
                                       reg_coef=cfg.align.reg_coef)
        w = k / V
        (loss * w).backward()
        for key, val in m.items():
            if key != "num_valid":
                sums[key] = sums.get(key, 0.0) + float(val) * w
        sums["disc_loss"] = sums.get("disc_loss", 0.0) + float(loss.detach()) * w
    sums["disc_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.disc_optim.grad_clip))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return sums


def check_teacher_fields(records) -> None:
    for rec in records:
        for key in ("teacher_caption", "teacher_cot"):
            if not rec.extra.get(key):
                raise ValueError(f"{rec.where(key)}: the alignment set needs teacher demonstrations")


def train_align(cfg: AlignConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run the adversarial alignment game; returns the folder of the final policy."""
    out, device, ckpt = start_run(cfg, resume)
    disc_path = cfg.disc.path if ckpt is None else str(ckpt / "disc")
    model, processor = load_stage_policy(cfg, device, None if ckpt is None else ckpt / "policy")
    disc = Discriminator.load(disc_path, device)
    disc.train()
    bad = BadRecords()
    prompts = stage_prompt_pool(cfg, processor, bad)
    check_teacher_fields(prompts.records)
    pol_params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(pol_params, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps * cfg.algo.ppo_epochs * cfg.algo.mini_batches)
    d_opt = build_optimizer(disc.parameters(), cfg.disc_optim)
    d_sched = build_scheduler(d_opt, cfg.disc_optim, cfg.train.steps)
    step, stream_state = 0, {"epoch": 0, "pos": 0}
    if ckpt is not None:
        st = load_trainer_state(ckpt)
        for obj, key in ((opt, "optimizer"), (sched, "scheduler"), (d_opt, "disc_optimizer"), (d_sched, "disc_scheduler")):
            obj.load_state_dict(st[key])
        set_rng_state(st["rng"])
        step, stream_state = st["step"], st["stream"]
    stream = PromptStream(prompts, cfg.train.seed, **stream_state, bad=bad if cfg.data.skip_bad else None)
    bad_steps = 0
    engine = HFEngine(model, processor, device, cache_implementation=cfg.rollout.cache_implementation)
    r = cfg.rollout
    params = SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    logger = MetricsLogger(out)
    logger.log(step, {"event": "start", "stage": "align", "prompts": len(prompts), "bad_records": bad.count,
                      "disc_variant": disc.variant, "resumed_from": str(ckpt) if ckpt else None})
    halt = min(cfg.train.steps, halt_at_step if halt_at_step is not None else cfg.train.steps)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="align", dynamic_ncols=True)

    def state() -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "disc_optimizer": d_opt.state_dict(),
                "disc_scheduler": d_sched.state_dict(), "stream": stream.state()}

    def save(at: int) -> Path:
        return save_checkpoint(out, at, {"policy": model, "disc": disc}, processor, state())

    with checkpoint_on_interrupt(lambda: save(step), (bar, logger)):
        while step < halt:
            t0 = time.time()
            batch_prompts = stream.take(r.prompts_per_step)
            ro = engine.generate(batch_prompts, params)
            t_gen = time.time() - t0
            t = time.time()
            sc = reward_scores(disc, processor, batch_prompts, ro, r.n, cfg.disc.batch_size)
            adv, info = A.align_advantages(sc.cap.cpu(), sc.reason.cpu(), sc.valid.cpu(), ro.group_ids,
                                           alpha=cfg.align.alpha, format_penalty=cfg.align.format_penalty)
            t_score = time.time() - t
            t = time.time()
            old_lp, ent = sequence_logprobs(model, ro, cfg.algo.micro_batch_size, device,
                                            temperature=r.temperature, with_entropy=True,
                                            chunk=cfg.train.logprob_chunk)
            t_lp = time.time() - t
            t = time.time()
            d_metrics = discriminator_step(disc, d_opt, d_sched, processor, batch_prompts, ro, sc.valid.cpu(),
                                           r.n, cfg) if cfg.align.disc_update else {}
            t_disc = time.time() - t
            t = time.time()
            upd = ppo_update(model, opt, sched, ro, adv, old_lp, cfg.algo, cfg.optim.grad_clip, device,
                             temperature=r.temperature, seed=cfg.train.seed + step, chunk=cfg.train.logprob_chunk)
            t_upd = time.time() - t
            step += 1
            bad_steps = nonfinite_streak(bad_steps, upd, step, out)
            verifiable = [compute_score(txt, rec.ground_truth or "") for txt, rec in zip(ro.texts, ro.records)]
            lengths = ro.response_lengths.float()
            metrics = {
                **d_metrics, **{f"policy_{k}": v for k, v in upd.items()},
                "format": float(sc.valid.float().mean()), "acc": sum(v.acc for v in verifiable) / len(ro),
                "student_cap_mean": float(sc.cap[sc.valid].mean()) if bool(sc.valid.any()) else 0.0,
                "student_reason_mean": float(sc.reason[sc.valid].mean()) if bool(sc.valid.any()) else 0.0,
                "adv_abs_mean": float(adv.abs().mean()), "invalid_frac": float(info["invalid_frac"]),
                "resp_len_mean": float(lengths.mean()), "entropy": float(A.masked_mean(ent, ro.response_mask)),
                "expert_load": sc.expert_load.tolist(), "time_rollout_s": t_gen, "time_score_s": t_score,
                "time_logprob_s": t_lp, "time_disc_s": t_disc, "time_update_s": t_upd,
                "time_step_s": time.time() - t0,
            }
            if step % cfg.train.log_every == 0 or step == halt:
                logger.log(step, metrics)
            bar.set_postfix(cap_gap=f"{metrics.get('cap_gap', 0):.2f}", reason_gap=f"{metrics.get('reason_gap', 0):.2f}",
                            fmt=f"{metrics['format']:.2f}")
            bar.update(1)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                save(step)
    if step < cfg.train.steps:
        return save(step) / "policy"
    final = out / "final"
    save_final(final / "policy", model, processor)
    disc.save(final / "disc", processor)
    (out / "summary.json").write_text(json.dumps({"steps": step}, indent=2))
    return final / "policy"
