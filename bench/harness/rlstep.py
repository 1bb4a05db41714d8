"""RL-step suite: one GRPO step of ``prism rl`` beside TRL's ``GRPOTrainer``, and the memory row.

Both sides: a fresh random-init model of the same shape and seed, fp32 master weights under bf16
autocast, gradient checkpointing, the same 448 px problems (encoded inside the step, as each
does in a real run), the same coin-flip reward (``bench/reward_random.py``), temperature 1,
one optimizer step per generation (TRL: ``gradient_accumulation_steps = steps_per_generation =
prompts x samples / micro``), ``micro`` sequences per forward/backward, no KL term.

Ours is ``prism_rl.trainers.rl.rl_step`` itself (sample, score, advantages, old log-probs, PPO
update) with the engine ``make_engine`` gives (``HFEngine`` when that is missing). TRL computes no
old log-probs when the policy is unchanged since sampling; prism always does: that work is in
its time. Each side runs one warm-up step, then ``reps`` timed steps (median); TRL's step time
runs from one ``on_step_end`` to the next, so it includes its data loading.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prism_rl.actor import NonfiniteGuard, ppo_update, sequence_logprobs
from prism_rl.config import ALGO_PRESETS, RLConfig, load_config
from prism_rl.data.processing import LazyPrompts
from prism_rl.data.stream import PromptStream
from prism_rl.models.mrope import install_batched_rope_index
from prism_rl.reward.plugins import load_reward_fn
from prism_rl.rollout.base import Rollouts
from prism_rl.trainers.optim import build_optimizer, build_scheduler
from prism_rl.trainers.rl import rl_step
from prism_rl.trainers.run import Run

from . import data
from .bounds import Counts, rl_step_bound_s
from .common import Ctx, engine_factory, error_note, guarded, prism_patched, row
from .measure import free, median, peak_gib, reset_peak, sync, timed
from .train import training_model

REWARD = str(Path(__file__).resolve().parents[1] / "reward_random.py") + ":score"


def rl_config(ctx: Ctx, prompts: int, n: int, new: int, micro: int, out: Path) -> RLConfig:
    """``prism rl --algo grpo`` with the benchmark's sizes (what the CLI would resolve)."""
    over = [f"rollout.n={n}", f"rollout.prompts_per_step={prompts}", f"rollout.max_new_tokens={new}",
            "rollout.temperature=1.0", f"algo.micro_batch_size={micro}", f"reward.function={REWARD}",
            "model.gradient_checkpointing=true", "train.steps=100", f"output_dir={out}",
            "data.max_prompt_length=4096"]
    return load_config(RLConfig, None, over, defaults=ALGO_PRESETS["grpo"])


class PrismRL:
    """prism's step pieces, set up as ``train_rl`` sets them up, on a model built in memory."""

    def __init__(self, ctx: Ctx, shape: str, prompts: int, n: int, new: int, micro: int, n_prompts: int, tag: str):
        self.ctx = ctx
        self.cfg = rl_config(ctx, prompts, n, new, micro, ctx.tmp / f"prism_{tag}")
        self.run = Run(self.cfg, "rl")
        self.run.device = ctx.device
        self.model = training_model(shape, ctx)
        install_batched_rope_index(self.model)   # as load_policy does, before the engine sees the model
        make, self.engine_label = engine_factory(ctx.engine)
        if make is None:
            from prism_rl.rollout.hf import HFEngine
            make, self.engine_label = (lambda m, p, d: HFEngine(m, p, d)), "prism hf engine (no make_engine)"
        self.engine = make(self.model, ctx.processor, ctx.device)
        self.stream = PromptStream(LazyPrompts(data.records(n_prompts, ctx.image_size), ctx.processor, 4096), 0)
        self.opt = build_optimizer(self.model.parameters(), self.cfg.optim)
        self.sched = build_scheduler(self.opt, self.cfg.optim, self.cfg.train.steps)
        self.reward = load_reward_fn(self.cfg.reward.function)
        self.guard = NonfiniteGuard(self.run.out)
        self.step_no = 0

    def step(self) -> tuple[Rollouts, dict]:
        self.step_no += 1
        return rl_step(self.run, self.step_no, self.model, self.engine, self.stream, self.cfg, self.reward,
                       self.opt, self.sched, None, self.guard)

    def close(self) -> None:
        self.run.close()
        for name in ("engine", "opt", "sched", "model"):
            setattr(self, name, None)


def time_prism(ctx: Ctx, shape: str, P: int, n: int, T: int, micro: int) -> dict:
    """Median step seconds (and its split) of ``reps`` steps after one warm-up step."""
    pr = PrismRL(ctx, shape, P, n, T, micro, P * (1 + ctx.reps), f"{P}x{n}x{T}")
    pr.step()
    pr.run.timings()
    reset_peak(ctx.device)
    times, splits = [], []
    for _ in range(ctx.reps):
        secs, (ro, _) = timed(pr.step, ctx.device)
        times.append(secs)
        splits.append(pr.run.timings())
    out = {"step_s": median(times), "steps_s": times, "peak_gib": peak_gib(ctx.device), "engine": pr.engine_label,
           "split": {k: median([s.get(k, 0.0) for s in splits]) for k in splits[0]}, "counts": Counts.of(pr.model),
           "rollouts": ro}
    pr.close()
    return out


def trl_available() -> str | None:
    """None when TRL's GRPOTrainer imports, else the reason it does not."""
    try:
        import datasets  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no TRL rows
        return f"n/a (trl not importable: {type(e).__name__}: {e})"[:200]
    return None


def trl_reward():
    """The coin-flip reward as a TRL reward function (conversational completions)."""
    fn = load_reward_fn(REWARD)

    def coin_flip(completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [fn(t, "").score for t in texts]
    return coin_flip


def time_trl(ctx: Ctx, shape: str, P: int, n: int, T: int, micro: int) -> dict:
    """Median seconds between consecutive ``on_step_end`` of ``reps`` steps after a warm-up step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync(ctx.device)
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(ctx.device)
            ends.append(time.perf_counter())

    cuda = ctx.device.type == "cuda"
    args = GRPOConfig(
        output_dir=str(ctx.tmp / f"trl_{P}x{n}x{T}"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=P * n // micro, num_generations=n, max_completion_length=T, temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        max_steps=1 + ctx.reps, gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, use_vllm=False,
        report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, shuffle_dataset=False, log_completions=False, max_grad_norm=1.0)
    model = training_model(shape, ctx)
    rows = data.trl_rows(data.records(P * (1 + ctx.reps), ctx.image_size))
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward()], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=ctx.processor, callbacks=[StepEnds()])
    reset_peak(ctx.device)
    trainer.train()
    steps = [b - a for a, b in zip(ends[1:], ends[2:])]
    out = {"step_s": median(steps), "steps_s": steps, "warmup_s": ends[1] - ends[0], "peak_gib": peak_gib(ctx.device)}
    del trainer, model
    return out


def step_bound(ctx: Ctx, counts: Counts, ro: Rollouts) -> float:
    firsts = [int((ro.group_ids == g).nonzero()[0]) for g in ro.group_ids.unique().tolist()]
    plen = ro.prompt_mask.sum(1).tolist()
    patches = ro.extras["patches_per_row"]
    return rl_step_bound_s(counts, ctx.calib, [plen[i] for i in firsts], [patches[i] for i in firsts], plen,
                           ro.response_mask.sum(1).tolist(), patches)


def run(ctx: Ctx) -> None:
    w = ctx.work
    for P, n, T in w.rl:
        config = f"GRPO step {w.rl_shape.upper()}: {P} prompts x {n} samples x {T} tokens, micro-batch {w.rl_micro}"
        if ctx.wanted(config):
            _run_config(ctx, config, P, n, T)
    config = (f"memory {w.mem_shape.upper()}: RL step, {w.mem[0]} prompt x {w.mem[1]} samples x {w.mem[2]}-token "
              f"responses, micro-batch {w.mem_micro}")
    if ctx.wanted(config):
        with guarded(ctx, "rlstep", config):
            ctx.emit(memory_row(ctx, config))


def _run_config(ctx: Ctx, config: str, P: int, n: int, T: int) -> None:
    ours = peer = None
    with guarded(ctx, "rlstep", config + " [ours]"):
        ours = time_prism(ctx, ctx.work.rl_shape, P, n, T, ctx.work.rl_micro)
    free(ctx.device)
    peer_note = trl_available() if ctx.trl else "n/a (--no-trl)"
    if peer_note is None:
        try:
            peer = time_trl(ctx, ctx.work.rl_shape, P, n, T, ctx.work.rl_micro)
        except Exception as e:  # noqa: BLE001 - TRL failing must not lose prism's numbers
            peer_note = "TRL " + error_note(e)
        free(ctx.device)
    ctx.emit(_row(ctx, config, ours, peer, peer_note or ""))


def _row(ctx: Ctx, config: str, ours: dict | None, peer: dict | None, peer_note: str) -> dict:
    bound = step_bound(ctx, ours.pop("counts"), ours.pop("rollouts")) if ours else None
    o_s, p_s = (ours or {}).get("step_s"), (peer or {}).get("step_s")
    frac = lambda s: None if bound is None or not s else bound / s
    note = "; ".join(x for x in (peer_note, "" if ours is None else _split_note(ours)) if x)
    return row("rlstep", config, "s/step", peer_name="TRL GRPOTrainer", peer=p_s,
               ours_name=(ours or {}).get("engine", "prism rl_step"), ours=o_s, higher_is_better=False,
               fraction=frac(o_s), peer_fraction=frac(p_s), note=note, bound_s=bound, prism=ours, trl=peer)


def _split_note(ours: dict) -> str:
    s = ours["split"]
    parts = [f"{k.split('/')[-1].removesuffix('_s')} {v:.1f}" for k, v in s.items() if k != "timing/step_s"]
    return "prism split s: " + ", ".join(parts)


def memory_row(ctx: Ctx, config: str) -> dict:
    """Peak memory of one RL step at the memory workload: a real ``rl_step`` when a dedicated
    engine is there (or ``--mem-rollout real``), else old log-probs + update on synthetic
    full-length rollouts (the training half, where the optimizer states and activations live)."""
    w = ctx.work
    P, n, T = w.mem
    real = ctx.mem_rollout == "real" or (ctx.mem_rollout == "auto" and ctx.engine != "hf"
                                         and engine_factory(ctx.engine)[0] is not None)
    free(ctx.device)
    reset_peak(ctx.device)
    if real:
        pr = PrismRL(ctx, w.mem_shape, P, n, T, w.mem_micro, P, "mem")
        secs, _ = timed(pr.step, ctx.device)
        split, label = pr.run.timings(), pr.engine_label + ", real rollout"
        pr.close()
    else:
        secs, split, label = _memory_synth(ctx, P, n, T), {}, "prism old log-probs + update, synthetic rollouts"
    peak = peak_gib(ctx.device)
    note = f"one step (no warm-up) {secs:.1f} s" + (f", peak {peak:.1f} GiB" if peak is not None else "")
    return row("rlstep", config, "peak GiB", ours_name=label, ours=peak, higher_is_better=False, note=note,
               step_s=secs, split=split)


def _memory_synth(ctx: Ctx, P: int, n: int, T: int) -> float:
    w = ctx.work
    model = training_model(w.mem_shape, ctx)
    cfg = rl_config(ctx, P, n, T, w.mem_micro, ctx.tmp / "prism_mem")
    enc = data.prompts(ctx.processor, P, ctx.image_size)
    ro = data.synth_rollouts(ctx.processor, enc, n, [T] * (P * n), model.config.text_config.vocab_size)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 10)
    adv = torch.randn(len(ro), generator=torch.Generator().manual_seed(0))

    def step():
        old = sequence_logprobs(model, ro, w.mem_micro, ctx.device, with_entropy=True)[0]
        ppo_update(model, opt, sched, ro, adv, old, cfg.algo, cfg.optim.grad_clip, ctx.device)
    with prism_patched(model):
        secs, _ = timed(step, ctx.device)
    return secs
