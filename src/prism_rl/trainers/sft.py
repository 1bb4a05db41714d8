"""Stage 1: supervised fine-tuning on tagged demonstrations (loss on assistant tokens only).

One loop: records -> encoded examples -> length-grouped micro-batches -> chunked CE ->
AdamW with warm-up + cosine -> checkpoints that resume exactly (same data order, same RNG).
The loss of one optimizer step is the token mean over all of its micro-batches, so gradient
accumulation gives the same update as one large batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ..config import SFTConfig
from ..data.layouts import read_records
from ..data.processing import Encoded, collate, encode_all, length_grouped_batches
from ..data.records import BadRecords
from ..models.loading import count_parameters, special_ids
from ..models.logprobs import sft_loss
from .common import (
    MetricsLogger, autocast_for, build_optimizer, build_scheduler, checkpoint_on_interrupt,
    load_stage_policy, load_trainer_state, save_checkpoint, save_final, set_rng_state, start_run,
)

log = logging.getLogger(__name__)


def load_examples(cfg: SFTConfig, processor, eos: int, bad: BadRecords) -> list[Encoded]:
    records = read_records(cfg.data.train, skip_bad=cfg.data.skip_bad, bad=bad)
    if cfg.data.limit:
        records = records[: cfg.data.limit]
    examples = encode_all(processor, records, eos_id=eos, max_length=cfg.data.max_length,
                          with_response=True, skip_bad=cfg.data.skip_bad, bad=bad)
    if not examples:
        raise ValueError(f"{cfg.data.train}: no usable training records ({bad.summary()})")
    return examples


def micro_batches(lengths: list[int], cfg: SFTConfig, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
    """Endless stream of (epoch, index-in-epoch, example indices); the order of an epoch is a
    pure function of (seed, epoch), which is what makes resuming exact."""
    while True:
        g = torch.Generator().manual_seed(cfg.train.seed * 1000003 + epoch)
        if cfg.train.group_by_length:
            batches = length_grouped_batches(lengths, cfg.train.batch_size, g)
        else:
            perm = torch.randperm(len(lengths), generator=g).tolist()
            batches = [perm[i:i + cfg.train.batch_size] for i in range(0, len(perm), cfg.train.batch_size)]
        for i in range(start, len(batches)):
            yield epoch, i, batches[i]
        epoch, start = epoch + 1, 0


def total_steps(cfg: SFTConfig, n_examples: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.batch_size) / cfg.train.grad_accum
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def train_sft(cfg: SFTConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run SFT; returns the folder of the final model. ``halt_at_step`` stops early (after
    saving a checkpoint) as an interruption would, for time-boxed jobs and tests."""
    out, device, ckpt = start_run(cfg, resume)
    model, processor = load_stage_policy(cfg, device, ckpt)
    eos, pad = special_ids(processor)

    bad = BadRecords()
    examples = load_examples(cfg, processor, eos, bad)
    if bad.count:
        log.warning("%s", bad.summary())
    lengths = [len(e) for e in examples]
    steps = total_steps(cfg, len(examples))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps)
    step, epoch, pos, tokens_seen = 0, 0, 0, 0
    if ckpt is not None:
        st = load_trainer_state(ckpt)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        step, epoch, pos, tokens_seen = st["step"], st["epoch"], st["pos"], st["tokens_seen"]

    total, trainable = count_parameters(model)
    logger = MetricsLogger(out)
    logger.log(step, {"event": "start", "params": total, "trainable_params": trainable,
                      "examples": len(examples), "bad_records": bad.count, "total_steps": steps,
                      "resumed_from": str(ckpt) if ckpt else None})
    stream = micro_batches(lengths, cfg, epoch, pos)
    bar = tqdm(total=steps, initial=step, desc="sft", dynamic_ncols=True)
    t0, tok_window, t_window = time.time(), 0, time.time()
    halt = halt_at_step if halt_at_step is not None else steps

    def state() -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                "pos": pos, "tokens_seen": tokens_seen}

    def save() -> Path:
        return save_checkpoint(out, step, {"": model}, processor, state())

    with checkpoint_on_interrupt(save, (bar, logger)):
        while step < min(steps, halt):
            group = [next(stream) for _ in range(cfg.train.grad_accum)]
            epoch, pos = group[-1][0], group[-1][1] + 1   # position after this step
            n_target = sum(int((examples[i].labels != -100).sum()) for _, _, idx in group for i in idx)
            loss_sum = 0.0
            for _, _, idx in group:
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad, "right").items()}
                with autocast_for(device):
                    loss, n = sft_loss(model, batch)
                (loss * n / n_target).backward()
                loss_sum += float(loss.detach()) * n
                tok_window += int(batch["attention_mask"].sum())
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.train.log_every == 0 or step == steps:
                now = time.time()
                tps = tok_window / max(now - t_window, 1e-9)
                tokens_seen += tok_window
                logger.log(step, {"loss": loss_sum / n_target, "lr": sched.get_last_lr()[0],
                                  "grad_norm": float(gnorm), "tokens_per_s": tps, "epoch": epoch,
                                  "tokens_seen": tokens_seen, "elapsed_s": now - t0})
                bar.set_postfix(loss=f"{loss_sum / n_target:.3f}", tok_s=f"{tps:,.0f}")
                tok_window, t_window = 0, now
            bar.update(1)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < steps:
                save()
    if step < steps:  # halted early: leave a checkpoint to resume from
        return save()
    final = save_final(out / "final", model, processor)
    (out / "summary.json").write_text(json.dumps({
        "steps": step, "examples": len(examples), "bad_records": bad.count, "wall_s": time.time() - t0,
        "bad_record_reasons": bad.reasons[:50]}, indent=2))
    return final
