"""Stage 2: adversarial on-policy distillation against the MoE discriminator (METHOD.md section 6).

One step:
1. sample ``n`` rollouts for each of ``prompts_per_step`` prompts (temperature 1.0);
2. score each rollout's caption and reasoning segments - cut in the token ids it sampled
   (``models.segments``) - with the discriminator as it is *before* this step's update
   (no grad): these scores are the reward;
3. recompute the old log-probs (unless on-policy: then the update's forward gives them);
4. A = alpha GN(cap) + (1 - alpha) GN(reason) - format_penalty F, with invalid rollouts'
   scores replaced by (lowest valid score in the group - 1), or -1 if none is valid;
5. update the discriminator: the prompt's teacher demonstration (tokenised once as a whole
   response, cut by the same rule) is the positive for each of its rollouts;
   L_D = mean_valid -log sigma(T_cap - S_cap) + mean_valid -log sigma(T_reason - S_reason)
   + reg_coef mean over every row of the squared scores (``algorithms.discriminator_loss``);
   computed group by group (one prompt and its rollouts per backward) with the step's totals
   as normalisers, which gives exactly the full-batch gradient. A step with no valid rollout
   still updates, on the regulariser alone (as the reference does);
6. update the policy with PPO-clip (no KL, no entropy bonus).
Health: the teacher-minus-student gap per segment (the reference run settles near 4.5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import algorithms as A
from ..actor import NonfiniteGuard, on_policy, ppo_update, sequence_logprobs
from ..config import AlignConfig
from ..data.prompt_format import check_prompts
from ..data.records import BadRecords, DataError
from ..data.stream import PromptStream, prompt_pool
from ..eval.perception import record_perception
from ..models.discriminator import Discriminator, SegmentScores, score_segments
from ..models.segments import Segments, rollout_segments, text_segments
from ..reward import batch_scores
from ..rollout import make_engine
from ..rollout.base import RolloutEngine, SamplingParams
from .checkpoint import save_final
from .optim import build_optimizer, build_scheduler
from .run import Run, load_stage_policy


def row_prompts(prompts, n: int):
    """The encoded prompt of each rollout row (prompts repeated ``n`` times, in row order)."""
    return [p for p in prompts for _ in range(n)]


@torch.no_grad()
def reward_scores(disc: Discriminator, processor, prompts, segs: list[Segments | None], n: int,
                  batch_size: int) -> SegmentScores:
    """Segment scores of every rollout from the frozen (eval-mode) discriminator."""
    was = disc.training
    disc.eval()
    sc = score_segments(disc, processor, row_prompts(prompts, n), segs, batch_size=batch_size)
    disc.train(was)
    return sc


def discriminator_step(disc: Discriminator, opt, sched, processor, prompts, segs: list[Segments | None],
                       teachers: Teachers, n: int, cfg: AlignConfig) -> dict[str, float]:
    """One discriminator update against the teachers of this step's prompts (step 5 above);
    returns ``disc/`` metrics (of the whole step)."""
    B, V = len(segs), sum(s is not None for s in segs)
    params = [p for p in disc.parameters() if p.requires_grad]
    kept = []
    for gi, prompt in enumerate(prompts):
        group = segs[gi * n:(gi + 1) * n]
        t = score_segments(disc, processor, [prompt], [teachers[prompt.record]], batch_size=cfg.disc.batch_size)
        s = score_segments(disc, processor, [prompt] * n, group, batch_size=cfg.disc.batch_size)
        scores = (t.cap.expand(n), s.cap, t.reason.expand(n), s.reason)
        loss, _ = A.discriminator_loss(*scores, s.valid, reg_coef=cfg.align.reg_coef, num_valid=V, num_rows=B)
        loss.backward()
        kept.append([x.detach() for x in scores] + [s.valid])
    full = [torch.cat(col) for col in zip(*kept)]
    loss, m = A.discriminator_loss(*full[:4], full[4], reg_coef=cfg.align.reg_coef)
    out = {f"disc/{k}": v for k, v in m.items() if k != "num_valid"}
    out["disc/loss"] = float(loss)
    out["disc/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.disc_optim.grad_clip))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    out["disc/lr"] = sched.get_last_lr()[0]
    return out


class Teachers:
    """Each alignment prompt's teacher demonstration as token segments, tokenised once.

    Built up front from every record, so a missing or malformed demonstration stops the run
    before training starts, naming the record and field.
    """

    def __init__(self, records, processor):
        self._segs: dict[int, Segments] = {}
        for rec in records:
            for key in ("teacher_caption", "teacher_cot"):
                if not isinstance(rec.extra.get(key), str) or not rec.extra[key]:
                    raise DataError(f"{rec.where(key)}: the alignment set needs teacher demonstrations")
            self._segs[id(rec)] = text_segments(processor, rec.extra["teacher_caption"], rec.extra["teacher_cot"],
                                                where=rec.where("teacher_cot"))

    def __getitem__(self, record) -> Segments:
        return self._segs[id(record)]


def check_align_prompts(records, cfg: AlignConfig) -> None:
    """Stop when the prompts ask for another response format than PRISM's: the format penalty
    punishes every rollout that follows such a prompt, and the teacher it is compared with
    answers in the PRISM format (:func:`~prism_rl.data.prompt_format.check_prompts`)."""
    if cfg.data.check_prompt_format:
        fixes = [f"rewrite the prompts to ask for the PRISM format: prism data convert {cfg.data.train} "
                 "--out NEW_FILE --prism-format", "set data.check_prompt_format=false to train on them anyway"]
        check_prompts(records, "prism", "alignment's format penalty", fixes)


def train_align(cfg: AlignConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run the adversarial alignment game; returns the folder of the final policy (or, when
    halted early, of the checkpoint's policy to resume from)."""
    run = Run(cfg, "align", resume=resume)
    ckpt = run.ckpt
    model, processor = load_stage_policy(cfg, run.device, None if ckpt is None else ckpt / "policy")
    disc = Discriminator.load(cfg.disc.path if ckpt is None else ckpt / "disc", run.device, dtype=torch.float32,
                              gradient_checkpointing=cfg.disc.gradient_checkpointing)
    disc.train()
    bad = BadRecords()
    d = cfg.data
    prompts = prompt_pool(d.train, processor, max_prompt_length=d.max_prompt_length, limit=d.limit,
                          skip_bad=d.skip_bad, bad=bad)
    teachers = Teachers(prompts.records, processor)   # no teacher demonstrations: nothing to align to
    check_align_prompts(prompts.records, cfg)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps * cfg.ppo.ppo_epochs * cfg.ppo.mini_batches)
    d_opt = build_optimizer(disc.parameters(), cfg.disc_optim)
    d_sched = build_scheduler(d_opt, cfg.disc_optim, cfg.train.steps)
    stream = PromptStream(prompts, cfg.train.seed, bad=bad if d.skip_bad else None)
    run.track({"policy": model, "disc": disc}, processor,
              {"optimizer": opt, "scheduler": sched, "disc_optimizer": d_opt, "disc_scheduler": d_sched,
               "stream": stream})
    engine = make_engine(cfg.rollout.engine, model, processor, run.device,
                         cache_implementation=cfg.rollout.cache_implementation, fused=cfg.rollout.fused)
    run.begin(cfg.train.steps, halt_at_step, prompts=len(prompts), bad_records=bad.count, disc_variant=disc.variant)
    guard = NonfiniteGuard(run.out)

    def save_both(final: Path) -> Path:
        save_final(final / "policy", model, processor)
        disc.save(final / "disc", processor)
        return final

    with run:
        for step in run.steps():
            with run.timer("step"):
                metrics = align_step(run, step, model, disc, processor, engine, stream, teachers, cfg, opt, sched,
                                     d_opt, d_sched, guard)
            run.show(cap_gap=metrics.get("disc/cap_gap", 0.0), reason_gap=metrics.get("disc/reason_gap", 0.0),
                     fmt=metrics["rollout/format"])
            run.log(step, metrics | run.timings())
        return run.finish(save_both, {"steps": run.step}) / "policy"


def align_step(run: Run, step: int, model, disc: Discriminator, processor, engine: RolloutEngine, stream: PromptStream,
               teachers: Teachers, cfg: AlignConfig, opt, sched, d_opt, d_sched, guard: NonfiniteGuard) -> dict:
    """One step of the game (steps 1-6 above); returns its metrics."""
    r = cfg.rollout
    params = SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    batch_prompts = stream.take(r.prompts_per_step)
    with run.timer("rollout"):
        ro = engine.generate(batch_prompts, params)
    with run.timer("score"):
        segs = rollout_segments(ro.response_ids, ro.response_mask, processor.tokenizer)
        sc = reward_scores(disc, processor, batch_prompts, segs, r.n, cfg.disc.batch_size)
        adv, _ = A.align_advantages(sc.cap.cpu(), sc.reason.cpu(), sc.valid.cpu(), ro.group_ids,
                                    alpha=cfg.align.alpha, format_penalty=cfg.align.format_penalty)
    with run.timer("logprob"):  # on-policy: the update's forward gives the old log-probs and entropy
        old_lp, ent = (None, None) if on_policy(cfg.ppo) else sequence_logprobs(
            model, ro, cfg.ppo.micro_batch_size, run.device, temperature=r.temperature, with_entropy=True,
            chunk=cfg.train.logprob_chunk, token_budget=cfg.ppo.micro_token_budget)
    with run.timer("disc"):
        d_metrics = discriminator_step(disc, d_opt, d_sched, processor, batch_prompts, segs, teachers, r.n,
                                       cfg) if cfg.align.disc_update else {}
    with run.timer("update"):
        upd = ppo_update(model, opt, sched, ro, adv, old_lp, cfg.ppo, cfg.optim.grad_clip, run.device,
                         temperature=r.temperature, seed=cfg.train.seed + step - 1, chunk=cfg.train.logprob_chunk)
    guard.check(upd, step)
    verifiable = batch_scores(ro.texts, [rec.ground_truth or "" for rec in ro.records])
    perception = [p for rec, t in zip(ro.records, ro.texts) if (p := record_perception(rec, t)) is not None]
    any_valid = bool(sc.valid.any())
    if ent is not None:
        upd["entropy"] = float(A.masked_mean(ent, ro.response_mask))
    return {
        **d_metrics, **{f"actor/{k}": v for k, v in upd.items()}, "actor/adv_abs_mean": float(adv.abs().mean()),
        "actor/lr": sched.get_last_lr()[0],
        "disc/student_cap_mean": float(sc.cap[sc.valid].mean()) if any_valid else 0.0,
        "disc/student_reason_mean": float(sc.reason[sc.valid].mean()) if any_valid else 0.0,
        "disc/expert_load": sc.expert_load.tolist(),
        "rollout/format": float(sc.valid.float().mean()), "rollout/acc": sum(v.acc for v in verifiable) / len(ro),
        "rollout/response_len_mean": float(ro.response_lengths.float().mean()),
        # the captions' perception score, on synthetic problems that carry their scene
        **({"rollout/perception": sum(perception) / len(perception)} if perception else {}),
    }
