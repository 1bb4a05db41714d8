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

Under torchrun the policy and the discriminator are sharded (FSDP2); each rank plays whole
groups of the step's prompts, sampled under per-prompt seeds, and every normaliser and metric
is summed over the ranks, so N processes give the one-process step.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .. import algorithms as A
from .. import distributed as D
from ..actor import NonfiniteGuard, on_policy, ppo_update, sequence_logprobs
from ..config import AlignConfig, ConfigError
from ..data.prompt_format import check_prompts
from ..data.records import BadRecords, DataError
from ..data.stream import PromptStream, prompt_pool
from ..eval.perception import record_perception
from ..models.discriminator import Discriminator, SegmentScores, idle_forward, score_segments, scoring_forwards
from ..models.segments import Segments, rollout_segments, text_segments
from ..reward import batch_scores
from ..rollout import make_engine
from ..rollout.base import RolloutEngine, Rollouts, SamplingParams
from ..rollout.noise import combine
from .dist_checkpoint import is_sharded, save_final
from .optim import build_optimizer, build_scheduler
from .run import Run, check_cpu_offload, load_stage_policy, stage_rollout_model
from .stage_disc import load_stage_disc, save_disc


def row_prompts(prompts, n: int):
    """The encoded prompt of each rollout row (prompts repeated ``n`` times, in row order)."""
    return [p for p in prompts for _ in range(n)]


@torch.no_grad()
def reward_scores(disc: Discriminator, processor, prompts, segs: list[Segments | None], n: int,
                  batch_size: int, teachers: Teachers | None = None) -> SegmentScores:
    """Segment scores of every rollout from the frozen (eval-mode) discriminator. Under
    torchrun a rank with fewer valid rollouts than another runs idle passes on a teacher
    demonstration (``teachers``) so the sharded forwards stay collective, and the root's
    gathered weights are freed afterwards (``distributed.reshard``)."""
    was = disc.training
    disc.eval()
    # the most passes any rank runs, agreed before the first pass: an all-reduce between two
    # ranks' forwards would interleave with FSDP2's all-gathers (measured: a hang at step 2)
    mine = scoring_forwards(sum(s is not None for s in segs), batch_size)
    most = int(D.all_reduce_max(mine)[0]) if D.is_distributed() else mine
    sc = score_segments(disc, processor, row_prompts(prompts, n), segs, batch_size=batch_size)
    even_forwards(disc, processor, prompts[0], teachers[prompts[0].record] if teachers else None, most - mine)
    sc.idle_forwards = most - mine
    D.reshard(disc)
    disc.train(was)
    return sc


def discriminator_step(disc: Discriminator, opt, sched, processor, prompts, segs: list[Segments | None],
                       teachers: Teachers, n: int, cfg: AlignConfig, groups: list[int] | None = None,
                       total_groups: int | None = None) -> dict[str, float]:
    """One discriminator update against the teachers of this step's prompts (step 5 above);
    returns ``disc/`` metrics (of the whole step).

    ``prompts`` are this rank's prompts (all of them in one process), ``groups`` their indices
    in the step's ``total_groups`` prompts. |V| and B are counted over every rank
    (``all_reduce_sum``) and each group's loss is multiplied by ``grad_scale`` (N), so the
    group-by-group backwards on N ranks add up to the one-process full-batch gradient; ranks
    that scored fewer sequences for a group run idle passes (:func:`even_forwards`)."""
    groups = list(range(len(prompts))) if groups is None else groups
    total_groups = len(prompts) if total_groups is None else total_groups
    V, B = (int(x) for x in D.all_reduce_sum(sum(s is not None for s in segs), len(segs)))
    params = [p for p in disc.parameters() if p.requires_grad]
    bs = cfg.disc.batch_size
    counts = [scoring_forwards(sum(s is not None for s in segs[gi * n:(gi + 1) * n]), bs) for gi in range(len(prompts))]
    most = [int(x) for x in D.all_reduce_max(*counts)] if D.is_distributed() else counts
    kept, idle = [], sum(most) - sum(counts)
    for gi, prompt in enumerate(prompts):
        group, teacher = segs[gi * n:(gi + 1) * n], teachers[prompt.record]
        t = score_segments(disc, processor, [prompt], [teacher], batch_size=bs)
        s = score_segments(disc, processor, [prompt] * n, group, batch_size=bs)
        scores = (t.cap.expand(n), s.cap, t.reason.expand(n), s.reason)
        loss, _ = A.discriminator_loss(*scores, s.valid, reg_coef=cfg.align.reg_coef, num_valid=V, num_rows=B)
        loss = loss + even_forwards(disc, processor, prompt, teacher, most[gi] - counts[gi])
        (loss * D.grad_scale()).backward()     # FSDP2 averages over ranks: scale to the sum
        kept.append(torch.stack([*(x.detach().float() for x in scores), s.valid.float()], 1))
    rows = [g * n + j for g in groups for j in range(n)]
    full = D.gather_rows(torch.cat(kept) if kept else torch.zeros(0, 5), rows, total_groups * n).float().unbind(1)
    loss, m = A.discriminator_loss(*full[:4], full[4].bool(), reg_coef=cfg.align.reg_coef)
    out = {f"disc/{k}": v for k, v in m.items() if k != "num_valid"}
    out["disc/loss"] = float(loss)
    out["disc/idle_passes"] = int(D.all_reduce_sum(idle)[0])   # passes run only to keep the ranks in step
    out["disc/grad_norm"] = D.clip_grad_norm(params, cfg.disc_optim.grad_clip)   # torchrun: over all shards
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    out["disc/lr"] = sched.get_last_lr()[0]
    return out


def even_forwards(disc: Discriminator, processor, prompt, teacher: Segments, count: int) -> torch.Tensor:
    """``count`` idle discriminator passes (``models.discriminator.idle_forward``), summed: a
    zero that a rank adds to its loss when it scored fewer sequences than another rank, so all
    ranks run the same collective forwards and backwards. One process: ``count`` is 0."""
    total = torch.zeros((), device=disc.device)
    for _ in range(count):
        total = total + idle_forward(disc, processor, prompt, teacher)
    return total


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


def check_distributed(cfg: AlignConfig) -> None:
    """Under torchrun each rank samples whole groups, the same number: ``rollout.prompts_per_step``
    must split evenly over the processes."""
    w = D.world()
    if w > 1 and cfg.rollout.prompts_per_step % w:
        raise ConfigError(f"rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) must be a multiple of the "
                          f"number of processes ({w}): each rank samples whole groups, the same number")
    if w > 1 and cfg.align.seed_per_prompt is False:
        raise ConfigError("align.seed_per_prompt=false: under torchrun each prompt is sampled under its own seed "
                          "(so the samples do not depend on the rank); leave it unset or true")


def train_align(cfg: AlignConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run the adversarial alignment game; returns the folder of the final policy (or, when
    halted early, of the checkpoint's policy to resume from). Under torchrun the policy and
    the discriminator are sharded (FSDP2) and each rank plays its share of the prompts."""
    run = Run(cfg, "align", resume=resume)
    check_distributed(cfg)
    ckpt = None if run.ckpt is None or is_sharded(run.ckpt) else run.ckpt  # a sharded one is loaded by run.track
    model, processor = load_stage_policy(cfg, run.device, None if ckpt is None else ckpt / "policy")
    check_cpu_offload(cfg.disc, "disc")
    disc = load_stage_disc(cfg.disc.path, run.device, resume_from=None if ckpt is None else ckpt / "disc",
                           gradient_checkpointing=cfg.disc.gradient_checkpointing, cpu_offload=cfg.disc.cpu_offload)
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
    gen_model = stage_rollout_model(cfg, model, run.device)   # torchrun: an unsharded copy (LoRA layers too)
    engine = make_engine(cfg.rollout.engine, gen_model, processor, run.device,
                         cache_implementation=cfg.rollout.cache_implementation, fused=cfg.rollout.fused)
    run.begin(cfg.train.steps, halt_at_step, prompts=len(prompts), bad_records=bad.count, disc_variant=disc.variant)
    guard = NonfiniteGuard(run.out)

    def save_both(final: Path) -> Path:
        save_final(final / "policy", model, processor)
        save_disc(final / "disc", disc, processor)
        return final

    with run:
        for step in run.steps():
            with run.timer("step"):
                metrics = align_step(run, step, model, disc, processor, engine, stream, teachers, cfg, opt, sched,
                                     d_opt, d_sched, guard)
            run.show(cap_gap=metrics.get("disc/cap_gap", 0.0), reason_gap=metrics.get("disc/reason_gap", 0.0),
                     fmt=metrics.get("rollout/format", 0.0))
            run.log(step, metrics | run.timings(), force="train/skipped" in metrics)
        return run.finish(save_both, {"steps": run.step}) / "policy"


def sample(engine: RolloutEngine, prompts, groups: list[int], params: SamplingParams, cfg: AlignConfig,
           step: int) -> Rollouts:
    """The rollouts of this rank's ``prompts`` (``groups``: their indices in the step's batch,
    the group ids), in one batched call. Seeded per prompt (``align.seed_per_prompt``, always
    under torchrun): every response's sampling noise is keyed by (``combine(train.seed, step)``,
    its prompt's index in the step's batch, its sample number) (``SamplingParams.seed``, ``rollout/noise.py``;
    both engines draw the same), so its samples do not depend on which rank drew the prompt or
    on the rest of the batch. Otherwise the run's RNG stream."""
    per_prompt = cfg.align.seed_per_prompt if cfg.align.seed_per_prompt is not None else D.is_distributed()
    if not per_prompt:
        return engine.generate(prompts, params, group_offset=groups[0] if groups else 0)
    keyed = replace(params, seed=combine(cfg.train.seed, step), prompt_keys=list(groups))
    ro = engine.generate(prompts, keyed, group_offset=0)
    ro.group_ids = torch.tensor(groups, dtype=ro.group_ids.dtype)[ro.group_ids]   # the groups' global indices
    return ro


def align_step(run: Run, step: int, model, disc: Discriminator, processor, engine: RolloutEngine, stream: PromptStream,
               teachers: Teachers, cfg: AlignConfig, opt, sched, d_opt, d_sched, guard: NonfiniteGuard) -> dict:
    """One step of the game (steps 1-6 above); returns its metrics. Under torchrun this rank
    plays whole groups of the step's prompts (``rl.rank_prompts``' split); the discriminator
    loss and the PPO update use global normalisers and the metrics are the global batch's."""
    r = cfg.rollout
    params = SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    batch_prompts = stream.take(r.prompts_per_step)
    groups = D.my_share([len(p) for p in batch_prompts])
    mine = [batch_prompts[g] for g in groups]
    with run.timer("rollout"):
        ro = guard.rollouts(lambda: sample(engine, mine, groups, params, cfg, step), step)
    if ro is None:   # NaN/inf logits on some rank: the step is skipped and counted
        return {"rollout/nonfinite": 1, "train/skipped": 1}
    with run.timer("score"):
        segs = rollout_segments(ro.response_ids, ro.response_mask, processor.tokenizer)
        sc = reward_scores(disc, processor, mine, segs, r.n, cfg.disc.batch_size, teachers)
        adv, _ = A.align_advantages(sc.cap.cpu(), sc.reason.cpu(), sc.valid.cpu(), ro.group_ids,
                                    alpha=cfg.align.alpha, format_penalty=cfg.align.format_penalty)
    with run.timer("logprob"):  # on-policy: the update's forward gives the old log-probs and entropy
        old_lp, ent = (None, None) if on_policy(cfg.ppo) else sequence_logprobs(
            model, ro, cfg.ppo.micro_batch_size, run.device, temperature=r.temperature, with_entropy=True,
            chunk=cfg.train.logprob_chunk, token_budget=cfg.ppo.micro_token_budget)
    with run.timer("disc"):
        d_metrics = discriminator_step(disc, d_opt, d_sched, processor, mine, segs, teachers, r.n, cfg, groups,
                                       len(batch_prompts)) if cfg.align.disc_update else {}
    with run.timer("update"):
        upd = ppo_update(model, opt, sched, ro, adv, old_lp, cfg.ppo, cfg.optim.grad_clip, run.device,
                         temperature=r.temperature, seed=cfg.train.seed + step - 1, chunk=cfg.train.logprob_chunk)
    with run.timer("weight_sync"):  # torchrun: full weights gathered into the rollout copy (one process: no-op)
        D.sync_weights(model, engine.model)
    guard.check(upd, step)
    if ent is not None:
        ent_sum, tokens = D.all_reduce_sum(float((ent * ro.response_mask).sum()), float(ro.response_mask.sum()))
        upd["entropy"] = ent_sum / max(tokens, 1.0)
    return {**d_metrics, **{f"actor/{k}": v for k, v in upd.items()}, "actor/lr": sched.get_last_lr()[0],
            **step_metrics(ro, sc, adv, groups, len(batch_prompts) * r.n)}


def step_metrics(ro: Rollouts, sc: SegmentScores, adv: torch.Tensor, groups: list[int], total: int) -> dict:
    """The step's rollout and reward metrics over the global batch: this rank's rows placed at
    their global positions (``distributed.gather_rows``; group g's rows are g*n .. g*n+n-1)
    and the expert load pooled by scored tokens, so N processes log the one-process values."""
    n = len(ro) // max(len(groups), 1)
    verifiable = batch_scores(ro.texts, [rec.ground_truth or "" for rec in ro.records])
    # the captions' perception score, on synthetic problems that carry their scene (eval/perception.py)
    perception = [record_perception(rec, t) for rec, t in zip(ro.records, ro.texts)]
    cols = torch.stack([adv.abs().float().cpu(), sc.cap.float().cpu(), sc.reason.float().cpu(), sc.valid.float().cpu(),
                        torch.tensor([v.acc for v in verifiable], dtype=torch.float32),
                        ro.response_lengths.float().cpu(),
                        torch.tensor([p or 0.0 for p in perception], dtype=torch.float32),
                        torch.tensor([p is not None for p in perception], dtype=torch.float32)], 1)
    table = D.gather_rows(cols, [g * n + j for g in groups for j in range(n)], total)
    adv_abs, cap, reason, valid, acc, length, percept, scored = table.unbind(1)
    v = valid.bool()
    load = D.all_reduce_sum(*(sc.expert_load.double().cpu() * sc.tokens).tolist(), sc.tokens, sc.idle_forwards)
    idle = int(load.pop())
    return {
        "disc/idle_score_passes": idle,
        "actor/adv_abs_mean": float(adv_abs.mean()),
        "disc/student_cap_mean": float(cap[v].mean()) if v.any() else 0.0,
        "disc/student_reason_mean": float(reason[v].mean()) if v.any() else 0.0,
        "disc/expert_load": [x / load[-1] for x in load[:-1]] if load[-1] > 0 else [0.0] * (len(load) - 1),
        "rollout/format": float(valid.mean()), "rollout/acc": float(acc.mean()),
        "rollout/response_len_mean": float(length.mean()),
        **({"rollout/perception": float(percept.sum() / scored.sum())} if scored.any() else {}),
    }
