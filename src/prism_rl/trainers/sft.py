"""Stage 1: supervised fine-tuning on tagged demonstrations (loss on assistant tokens only).

One loop: records -> encoded examples -> length-grouped micro-batches -> chunked CE ->
AdamW with warm-up + cosine -> checkpoints that resume exactly (same data order, same RNG).
The loss of one optimizer step is the token mean over all of its micro-batches, so gradient
accumulation gives the same update as one large batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import distributed as D
from ..actor import NonfiniteGuard
from ..config import SFTConfig
from ..data.layouts import read_records
from ..data.processing import Encoded, OverlongError, collate, encode_sft, length_grouped_batches, skip_or_raise
from ..data.records import BadRecords, DataError
from ..models.loading import autocast_for, count_parameters, special_ids
from ..models.logprobs import sft_loss
from .dist_checkpoint import save_final
from .optim import build_optimizer, build_scheduler
from .run import Run, load_stage_policy

log = logging.getLogger(__name__)


def load_examples(cfg: SFTConfig, processor, eos: int, bad: BadRecords,
                  overlong_skipped: BadRecords | None = None) -> list[Encoded]:
    """Encode the training records. Over ``data.max_length``, ``data.overlong`` decides: truncate
    (``Encoded.truncated``), skip (noted in ``overlong_skipped``) or raise; other bad records
    follow ``data.skip_bad``."""
    d = cfg.data
    records = read_records(d.train, skip_bad=d.skip_bad, bad=bad)
    if d.limit:
        records = records[: d.limit]
    examples = []
    for rec in records:
        try:
            examples.append(encode_sft(processor, rec, eos, d.max_length, overlong=d.overlong))
        except OverlongError as e:
            if d.overlong != "skip":
                skip_or_raise(rec, e, d.skip_bad, bad)
            elif overlong_skipped is not None:
                overlong_skipped.add(rec.where(), str(e).split(": ", 1)[-1])
        except DataError as e:
            skip_or_raise(rec, e, d.skip_bad, bad)
    if not examples:
        raise DataError(f"{d.train}: no usable training records ({bad.summary()}; "
                        f"{overlong_skipped.count if overlong_skipped else 0} over data.max_length skipped)")
    return examples


def overlong_report(cfg: SFTConfig, examples: list[Encoded], skipped: BadRecords) -> dict:
    """What ``data.overlong`` did, for the run's start event and summary (nothing is lost silently)."""
    cut = [e for e in examples if e.truncated]
    report = {"mode": cfg.data.overlong, "max_length": cfg.data.max_length, "truncated": len(cut),
              "tokens_cut": sum(e.truncated for e in cut), "skipped": skipped.count,
              "records": [e.record.where() for e in cut[:20] if e.record is not None] + skipped.reasons[:20]}
    if cut or skipped.count:
        log.warning("data.max_length=%d: %d examples truncated (%d response tokens cut), %d skipped; e.g. %s",
                    cfg.data.max_length, len(cut), report["tokens_cut"], skipped.count, report["records"][:3])
    return report


class BatchStream:
    """Endless stream of micro-batches (lists of example indices); ``(epoch, pos)`` after the
    last optimizer step is its resumable state. The order of an epoch is a pure function of
    (seed, epoch), which is what makes resuming exact."""

    def __init__(self, lengths: list[int], cfg: SFTConfig):
        self.lengths, self.cfg = lengths, cfg
        self.epoch = self.pos = 0
        self._it: Iterator[tuple[int, int, list[int]]] | None = None

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        bs = self.cfg.train.batch_size
        while True:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + epoch)
            if self.cfg.train.group_by_length:
                batches = length_grouped_batches(self.lengths, bs, g)
            else:
                perm = torch.randperm(len(self.lengths), generator=g).tolist()
                batches = [perm[i:i + bs] for i in range(0, len(perm), bs)]
            for i in range(start, len(batches)):
                yield epoch, i, batches[i]
            epoch, start = epoch + 1, 0

    def take(self, k: int) -> list[list[int]]:
        """The next ``k`` micro-batches (one optimizer step's worth)."""
        if self._it is None:
            self._it = self._batches(self.epoch, self.pos)
        group = [next(self._it) for _ in range(k)]
        self.epoch, self.pos = group[-1][0], group[-1][1] + 1   # position after this step
        return [idx for _, _, idx in group]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None


def total_steps(cfg: SFTConfig, n_examples: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.batch_size) / (cfg.train.grad_accum * D.world())  # global batch
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def train_sft(cfg: SFTConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Run SFT; returns the folder of the final model. ``halt_at_step`` stops early (after
    saving a checkpoint) as an interruption would, for time-boxed jobs and tests."""
    run = Run(cfg, "sft", resume=resume)
    model, processor = load_stage_policy(cfg, run.device, run.ckpt)
    eos, pad = special_ids(processor)
    bad, overlong_skipped = BadRecords(), BadRecords()
    examples = load_examples(cfg, processor, eos, bad, overlong_skipped)
    if bad.count:
        log.warning("%s", bad.summary())
    overlong = overlong_report(cfg, examples, overlong_skipped)
    steps = total_steps(cfg, len(examples))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps)
    batches = BatchStream([len(e) for e in examples], cfg)
    progress = {"tokens_seen": 0}
    saved = run.track({"": model}, processor, {"optimizer": opt, "scheduler": sched, "stream": batches},
                      extra=lambda: dict(progress))
    progress["tokens_seen"] = saved.get("tokens_seen", 0)
    total, trainable = count_parameters(model)
    run.begin(steps, halt_at_step, params=total, trainable_params=trainable, examples=len(examples),
              bad_records=bad.count, total_steps=steps, overlong=overlong)
    t0, tok_window, t_window = time.time(), 0, time.time()
    guard = NonfiniteGuard(run.out)
    with run:
        for step in run.steps():
            group = rank_share([[examples[i] for i in idx] for idx in batches.take(cfg.train.grad_accum * D.world())])
            loss, tokens = sft_step(model, group, pad, run.device)
            tok_window += tokens
            gnorm = D.clip_grad_norm(params, cfg.optim.grad_clip)  # distributed: the norm over all shards
            if guard.step_ok(step, loss, gnorm):   # a NaN/inf step is skipped; three in a row stop the run
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if run.log_due(step):
                now = time.time()
                tps = tok_window / max(now - t_window, 1e-9)
                progress["tokens_seen"] += tok_window
                run.log(step, {"actor/loss": loss, "actor/lr": sched.get_last_lr()[0], "actor/grad_norm": float(gnorm),
                               "timing/tokens_per_s": tps, "timing/elapsed_s": now - t0, "train/epoch": batches.epoch,
                               "train/tokens_seen": progress["tokens_seen"]})
                run.show(loss=loss, tok_s=tps)
                tok_window, t_window = 0, now
        return run.finish(lambda folder: save_final(folder, model, processor),
                          {"steps": run.step, "examples": len(examples), "bad_records": bad.count,
                           "wall_s": time.time() - t0, "bad_record_reasons": bad.reasons[:50],
                           "overlong": overlong})


def rank_share(micros: list[list[Encoded]]) -> list[list[Encoded]]:
    """This rank's micro-batches of a step's global ``grad_accum x world`` (all of them in one
    process): equal counts per rank, balanced by tokens (:func:`distributed.my_share`)."""
    return [micros[i] for i in D.my_share([sum(len(e) for e in m) for m in micros])]


def sft_step(model, group: list[list[Encoded]], pad: int, device: torch.device) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches; the loss is the token mean
    over all of them, so gradient accumulation gives the update of one large batch. Returns
    (that loss, tokens seen).

    loss = -(1/N) sum_{target tokens t of the step} log p(t), N counted over every rank's
    micro-batches (all-reduced), so 1 or N processes give the same loss and gradient; each
    rank's part is scaled by ``grad_scale`` since FSDP2 averages gradients over ranks."""
    n_local = sum(int((e.labels != -100).sum()) for micro in group for e in micro)
    n_target = D.all_reduce_sum(n_local)[0]  # distributed: the global token count
    loss_sum, tokens = 0.0, 0
    for micro in group:
        batch = {k: v.to(device) for k, v in collate(micro, pad, "right").items()}
        with autocast_for(device):
            loss, n = sft_loss(model, batch)
        (loss * n * D.grad_scale() / n_target).backward()
        loss_sum += float(loss.detach()) * n
        tokens += int(batch["attention_mask"].sum())
    loss_sum, tokens = D.all_reduce_sum(loss_sum, tokens)
    return loss_sum / n_target, int(tokens)
