"""Stage 3: RL with verifiable rewards — GRPO, DAPO and GSPO in one loop.

One step: take ``prompts_per_step`` prompts -> sample ``n`` responses each -> score them with
the verifiable reward (plus DAPO's overlong shaping) -> [DAPO: drop groups whose accuracy
has zero variance and sample more, up to ``max_num_gen_batches`` rounds] -> group-normalised
advantages -> recompute old log-probs (unless the update is on-policy: then its own forward
gives them) -> PPO-clip updates over mini-batches (``actor.py``).
The presets of METHOD.md section 7 live in ``config.ALGO_PRESETS``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from .. import algorithms as A
from .. import distributed as D
from ..actor import NonfiniteGuard, on_policy, ppo_update, sequence_logprobs
from ..config import ConfigError, RLConfig
from ..data.processing import Encoded, load_prompts
from ..data.prompt_format import check_prompts
from ..data.records import BadRecords, Record
from ..data.stream import PromptStream, prompt_pool, with_ground_truth
from ..eval.evaluate import summarize
from ..eval.sampling import generate_and_score
from ..models.loading import load_policy, special_ids
from ..reward import batch_scores, compute_score
from ..reward.builtins import builtin_reward, is_builtin
from ..reward.plugins import RewardFn, load_reward_option
from ..rollout import make_engine
from ..rollout.base import RolloutEngine, Rollouts, SamplingParams, concat_rollouts
from ..rollout.noise import combine
from .dist_checkpoint import save_final
from .optim import build_optimizer, build_scheduler
from .rl_dist import all_groups, global_group_ids, share_kept
from .run import Run, load_stage_policy, stage_rollout_model


def score(ro: Rollouts, cfg: RLConfig, reward_fn: RewardFn | None) -> dict[str, torch.Tensor]:
    """Rewards (B,), accuracy and format flags; DAPO overlong shaping added to the reward.

    Scored through ``batch_scores``, the path ``prism reward`` takes: a built-in reward with
    the configured weights, or the plug-in ``reward.function``."""
    builtin = reward_fn is None or is_builtin(reward_fn)
    weights = {"acc_weight": cfg.reward.acc_weight, "format_weight": cfg.reward.format_weight} if builtin else {}
    results = batch_scores(ro.texts, [r.ground_truth or "" for r in ro.records], reward_fn=reward_fn, **weights)
    reward = torch.tensor([r.score for r in results], dtype=torch.float32)
    out = {"reward": reward, "acc": torch.tensor([r.acc for r in results], dtype=torch.float32),
           "format": torch.tensor([r.format for r in results], dtype=torch.float32)}
    algo = cfg.algo
    if algo.overlong_buffer > 0:
        pen = A.overlong_penalty(ro.response_lengths.float(), cfg.rollout.max_new_tokens, algo.overlong_buffer,
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


def collect(engine: RolloutEngine, stream: PromptStream, cfg: RLConfig, reward_fn: RewardFn | None,
            run: Run, step: int, guard: NonfiniteGuard) -> tuple[Rollouts | None, dict, dict]:
    """Sample and score one training batch (with DAPO's dynamic sampling when enabled).

    Returns ``None`` rollouts when dynamic sampling kept no group in ``max_num_gen_batches``
    rounds (every group all right or all wrong), or when the engine found NaN/inf logits
    (:meth:`NonfiniteGuard.rollouts`, ``rollout/nonfinite``): the step is then skipped and logged.
    """
    r, algo = cfg.rollout, cfg.algo
    per_round = r.gen_batch_prompts or r.prompts_per_step
    parts, scores, kept_groups, rounds, offset = [], [], [], 0, 0
    while True:
        rounds += 1
        batch = stream.take(per_round)
        mine = D.my_share([len(p) for p in batch])   # this rank's prompts (whole groups), as rank_prompts
        params = sampling_params(cfg, step, rounds, mine)
        with run.timer("rollout"):
            ro = guard.rollouts(partial(engine.generate, [batch[i] for i in mine], params, group_offset=offset), step)
            if ro is None:
                return None, {}, {"rollout/nonfinite": 1, "rollout/gen_rounds": rounds}
            ro = global_group_ids(ro, mine, offset)
        with run.timer("score"):
            sc = score(ro, cfg, reward_fn)
        offset += per_round
        groups = groups_with_variance(ro.group_ids, sc["acc"]) if algo.dynamic_sampling else ro.group_ids.unique().tolist()
        parts.append(ro)
        scores.append(sc)
        kept_groups += all_groups(groups) if algo.dynamic_sampling else groups   # torchrun: the ranks agree
        if not algo.dynamic_sampling or len(kept_groups) >= r.prompts_per_step or rounds >= algo.max_num_gen_batches:
            break
    ro = concat_rollouts(parts, engine.pad_id)
    sc = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
    kept = set(kept_groups[: r.prompts_per_step])
    stats = {"rollout/gen_rounds": rounds, "rollout/prompts_sampled": offset, **sampled_stats(sc)}
    rows = [i for i, g in enumerate(ro.group_ids.tolist()) if g in kept]
    ro, sc = (ro.select(rows), {k: v[rows] for k, v in sc.items()}) if rows else (None, None)
    if algo.dynamic_sampling and D.is_distributed():   # kept groups spread unevenly: equal shares again
        ro, sc = share_kept(ro, sc, engine.pad_id)
    stats["rollout/groups_kept"] = int(D.all_reduce_sum(0 if ro is None else len(ro.group_ids.unique()))[0])
    if ro is None:
        return None, {}, stats
    return ro, sc, stats


def sampled_stats(sc: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean reward / accuracy / format of every sampled response (kept or not), summed over
    ranks: ``mean = sum_ranks sum_rows x / sum_ranks rows``."""
    rows, *sums = D.all_reduce_sum(len(sc["reward"]), *(sc[k].sum() for k in ("reward", "acc", "format")))
    return {f"rollout/{k}_all": v / rows for k, v in zip(("reward", "acc", "format"), sums)}


def sampling_params(cfg: RLConfig, step: int, round_: int, prompt_keys: list[int]) -> SamplingParams:
    """The rollout's sampling settings; with ``rollout.per_row_seeds`` also the round's seed
    ``combine(train.seed, step, round)`` and the keys of this rank's prompts (their places in
    the round's global batch), so each response's noise is the same on any number of ranks."""
    r = cfg.rollout
    seeded = {"seed": combine(cfg.train.seed, step, round_), "prompt_keys": prompt_keys} if r.per_row_seeds else {}
    return SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, **seeded)


def rank_prompts(prompts: list[Encoded]) -> list[Encoded]:
    """This rank's prompts of a global batch (all of them in one process): each prompt's n
    samples stay on one rank, so the group normalisation of the advantages is exact; equal
    counts per rank, balanced by prompt tokens (:func:`distributed.my_share`)."""
    return [prompts[i] for i in D.my_share([len(p) for p in prompts])]


def rollout_metrics(ro: Rollouts, sc: dict[str, torch.Tensor]) -> dict[str, float]:
    """What the kept rollouts scored and how long they were (``rollout/`` metrics), over the
    global batch: under torchrun each mean is sum over ranks / row count over ranks and the
    maximum a max over ranks (two small all-reduces), so N processes log what one would."""
    lengths = ro.response_lengths.float()
    truncated = sum(f == "length" for f in ro.finish_reasons)
    rows, reward, acc, fmt, total_len, trunc = D.all_reduce_sum(
        len(ro), sc["reward"].sum(), sc["acc"].sum(), sc["format"].sum(), lengths.sum(), truncated)
    (longest,) = D.all_reduce_max(lengths.max())
    return {"rollout/reward": reward / rows, "rollout/acc": acc / rows, "rollout/format": fmt / rows,
            "rollout/response_len_mean": total_len / rows, "rollout/response_len_max": longest,
            "rollout/truncated_frac": trunc / rows}


def greedy_eval(engine: RolloutEngine, prompts: list[Encoded], max_new_tokens: int,
                reward_fn: RewardFn | None = None, batch_size: int = 64) -> dict:
    """Greedy accuracy / format / length on ``prompts`` with the run's reward (default the
    built-in PRISM reward), summarised as ``prism eval`` does. Under torchrun each rank decodes
    its share (``uneven_shares`` by prompt tokens; no collectives in generation) and every rank
    summarises all rows, gathered back in prompt order: the 1-process summary."""
    params = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    fn = reward_fn or compute_score

    def row(rec: Record, text: str, n_tok: int, finish: str) -> dict:
        res = fn(text, rec.ground_truth or "")
        return {"id": rec.id, "task": rec.task, "acc": res.acc, "format": res.format, "tokens": n_tok,
                "finish": finish}

    mine = D.uneven_shares([len(p) for p in prompts], D.world())[D.rank()]   # torchrun: each rank its share
    rows = generate_and_score(engine, [prompts[i] for i in mine], params, batch_size, row, desc="eval")
    return summarize(D.gather_in_order(mine, rows, len(prompts)))


def check_distributed(cfg: RLConfig) -> None:
    """Under torchrun: each round's prompts must split evenly over the processes (whole groups,
    equal counts)."""
    w = D.world()
    per_round = cfg.rollout.gen_batch_prompts or cfg.rollout.prompts_per_step
    if w > 1 and per_round % w:
        raise ConfigError(f"rollout.prompts_per_step / gen_batch_prompts ({per_round}) must be a multiple of the "
                          f"number of processes ({w}): each rank samples whole groups, the same number")


def check_rl_prompts(records: list[Record], cfg: RLConfig) -> None:
    """Stop before training when the prompts ask for a response format that ``reward.function``
    does not score (:func:`~prism_rl.data.prompt_format.check_prompts`); a plug-in reward's
    format is unknown, so its prompts are not checked."""
    builtin = builtin_reward(cfg.reward.function)
    if builtin is None or not cfg.data.check_prompt_format:
        return
    fixes = ["set reward.function to the reward that scores the prompts' format (boxed for \\boxed{} answers, "
             "or a plug-in path/to/file.py:function)"]
    if builtin.convention == "prism":
        fixes.append(f"rewrite the prompts to ask for the PRISM format: prism data convert {cfg.data.train} "
                     "--out NEW_FILE --prism-format")
    fixes.append("set data.check_prompt_format=false to train on them anyway")
    check_prompts(records, builtin.convention, f"reward.function: {builtin.label}", fixes)


def train_rl(cfg: RLConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run RLVR with ``cfg.algo``; returns the folder of the final policy (or, when halted
    early, of the checkpoint to resume from)."""
    reward_fn = load_reward_option(cfg.reward.function, "reward.function")
    run = Run(cfg, "rl", resume=resume, desc=f"rl-{cfg.algo.name}")
    check_distributed(cfg)
    model, processor = load_stage_policy(cfg, run.device, run.ckpt)
    eos, _ = special_ids(processor)
    bad = BadRecords()
    d = cfg.data
    need_truth = reward_fn is None or is_builtin(reward_fn)  # a plug-in may score without one
    prompts = prompt_pool(d.train, processor, max_prompt_length=d.max_prompt_length, limit=d.limit,
                          skip_bad=d.skip_bad, bad=bad, need_ground_truth=need_truth)
    check_rl_prompts(prompts.records, cfg)
    eval_prompts = load_prompts(d.eval, processor, eos_id=eos, max_length=d.max_prompt_length,
                                limit=cfg.train.eval_limit, skip_bad=d.skip_bad, bad=bad) \
        if d.eval and cfg.train.eval_every else []
    if need_truth:
        eval_prompts = with_ground_truth(eval_prompts, d.skip_bad, bad)
    ref = None
    if cfg.algo.kl_coef > 0:   # the frozen reference policy; under torchrun sharded like the policy (FSDP2)
        ref = D.shard_model(load_policy(cfg.model, D.load_device(run.device), trainable=False)[0], run.device)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps * cfg.algo.ppo_epochs * cfg.algo.mini_batches)
    stream = PromptStream(prompts, cfg.train.seed, bad=bad if d.skip_bad else None)
    run.track({"": model}, processor, {"optimizer": opt, "scheduler": sched, "stream": stream})
    gen_model = stage_rollout_model(cfg, model, run.device)   # torchrun: an unsharded copy
    engine = make_engine(cfg.rollout.engine, gen_model, processor, run.device,
                         cache_implementation=cfg.rollout.cache_implementation, fused=cfg.rollout.fused)
    run.begin(cfg.train.steps, halt_at_step, algo=cfg.algo.name, prompts=len(prompts), bad_records=bad.count)
    guard = NonfiniteGuard(run.out)
    with run:
        for step in run.steps():
            with run.timer("step"):
                ro, metrics = rl_step(run, step, model, engine, stream, cfg, reward_fn, opt, sched, ref, guard)
            metrics |= run.timings()
            if ro is None:  # no mixed-outcome group (dynamic sampling) or NaN logits: nothing to learn from
                run.log(step, metrics | {"train/skipped": 1}, force=True)
                continue
            (tokens,) = D.all_reduce_sum(ro.response_mask.sum() + ro.prompt_mask.sum())   # all ranks' tokens
            metrics["timing/tokens_per_s"] = tokens / max(metrics["timing/step_s"], 1e-9)
            if eval_prompts and step % cfg.train.eval_every == 0:
                ev = greedy_eval(engine, eval_prompts, cfg.rollout.max_new_tokens, reward_fn)
                metrics.update({"eval/acc": ev["overall"]["accuracy"], "eval/format": ev["overall"]["format_rate"]})
            run.show(reward=metrics["rollout/reward"], acc=metrics["rollout/acc"])
            run.log(step, metrics)
        return run.finish(lambda folder: save_final(folder, model, processor),
                          {"steps": run.step, "algo": cfg.algo.name, "bad_records": bad.count,
                           "bad_record_reasons": bad.reasons})


def rl_step(run: Run, step: int, model, engine: RolloutEngine, stream: PromptStream, cfg: RLConfig,
            reward_fn: RewardFn | None, opt, sched, ref, guard: NonfiniteGuard) -> tuple[Rollouts | None, dict]:
    """Sample, score, advantages, old log-probs, PPO update; returns the rollouts trained on
    (``None`` for a skipped step) and the step's metrics."""
    ro, sc, stats = collect(engine, stream, cfg, reward_fn, run, step, guard)
    if ro is None:
        return None, stats
    algo, temp, chunk = cfg.algo, cfg.rollout.temperature, cfg.train.logprob_chunk
    adv = A.grpo_advantages(sc["reward"], ro.group_ids, norm_by_std=algo.norm_by_std, eps=algo.adv_eps)
    lp_args = dict(micro=algo.micro_batch_size, device=run.device, temperature=temp, chunk=chunk,
                   token_budget=algo.micro_token_budget)
    with run.timer("logprob"):  # on-policy: the update's forward gives the old log-probs and entropy
        old_lp, ent = (None, None) if on_policy(algo) else sequence_logprobs(model, ro, with_entropy=True, **lp_args)
        ref_lp = sequence_logprobs(ref, ro, **lp_args) if ref is not None else None
    with run.timer("update"):
        upd = ppo_update(model, opt, sched, ro, adv, old_lp, algo, cfg.optim.grad_clip, run.device,
                         temperature=temp, kl_coef=algo.kl_coef, ref_lp=ref_lp, seed=cfg.train.seed + step - 1,
                         chunk=chunk)
    with run.timer("weight_sync"):  # torchrun: full weights gathered into the rollout copy (one process: no-op)
        D.sync_weights(model, engine.model)
    guard.check(upd, step)
    metrics = {**stats, **rollout_metrics(ro, sc), **{f"actor/{k}": v for k, v in upd.items()},
               "actor/adv_abs_mean": float(adv.abs().mean()), "actor/lr": sched.get_last_lr()[0]}
    if ent is not None:
        metrics["actor/entropy"] = float(A.masked_mean(ent, ro.response_mask))
    return ro, metrics
