"""Discriminator warm-up: teach the MoE discriminator to prefer teacher segments.

Each pair gives a caption pair and a reasoning pair (teacher vs student, same prompt). Loss
per optimizer step (METHOD.md section 5):

    L = mean -log sigma(s_T^cap - s_S^cap) + mean -log sigma(s_T^reason - s_S^reason)
        + aux_coef * load_balancing_loss

Pairs come from a JSONL in the reference layout, or are built here by sampling the SFT policy
on the alignment prompts (``sample_pairs``). A held-out split reports pair accuracy and the
mean teacher-minus-student gap per segment. Checkpoints resume exactly, like every stage's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import algorithms as A
from ..config import ModelConfig, WarmupConfig
from ..data.layouts import PairRecord, read_pairs, write_pairs
from ..data.processing import Encoded, encode_all, load_prompts
from ..data.records import BadRecords
from ..format import split_text
from ..models.discriminator import Discriminator, score_texts
from ..models.loading import load_policy, load_processor, pick_device, special_ids
from ..rollout.base import SamplingParams
from ..rollout.hf import HFEngine
from .optim import build_optimizer, build_scheduler
from .run import Run


def sample_pairs(policy_dir: str, data: str, out: str, *, n: int = 1, max_new_tokens: int = 1024,
                 temperature: float = 1.0, limit: int | None = None, seed: int = 0,
                 batch_prompts: int = 32) -> dict:
    """Sample the policy on ``data`` (which carries teacher fields) and write warm-up pairs.

    Format-invalid student responses cannot be split into segments: they are skipped and
    counted in the returned stats (and never silently dropped).
    """
    torch.manual_seed(seed)
    model, processor = load_policy(ModelConfig(path=policy_dir), pick_device(), trainable=False)
    eos, _ = special_ids(processor)
    prompts = load_prompts(data, processor, eos_id=eos, max_length=100_000, limit=limit)
    missing = [p.record.where("teacher_caption") for p in prompts if "teacher_caption" not in p.record.extra]
    if missing:
        raise ValueError(f"{missing[0]}: warm-up pairs need teacher_caption/teacher_cot fields")
    engine = HFEngine(model, processor)
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    pairs, invalid = [], 0
    for s in tqdm(range(0, len(prompts), batch_prompts), desc="pairs", dynamic_ncols=True):
        ro = engine.generate(prompts[s:s + batch_prompts], params)
        for text, rec in zip(ro.texts, ro.records):
            seg = split_text(text)
            if seg is None:
                invalid += 1
                continue
            pairs.append(PairRecord(record=rec, teacher_caption=rec.extra["teacher_caption"],
                                    student_caption=seg[0], teacher_cot=rec.extra["teacher_cot"],
                                    student_cot=seg[1].lstrip()))
    write_pairs(pairs, out)
    stats = {"prompts": len(prompts), "samples": len(prompts) * n, "pairs": len(pairs),
             "invalid_student_skipped": invalid}
    Path(out).with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def pair_batch_loss(disc: Discriminator, processor, prompts: list[Encoded], pairs: list[PairRecord],
                    aux_coef: float, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss of one batch of pairs (+ aux), with accuracy and gap metrics."""
    t = score_texts(disc, processor, prompts, [p.teacher_caption for p in pairs],
                    [p.teacher_cot for p in pairs], batch_size=batch_size)
    s = score_texts(disc, processor, prompts, [p.student_caption for p in pairs],
                    [p.student_cot for p in pairs], batch_size=batch_size)
    bt_cap = A.bradley_terry_loss(t.cap, s.cap)
    bt_reason = A.bradley_terry_loss(t.reason, s.reason)
    aux = 0.5 * (t.aux_loss + s.aux_loss)
    loss = bt_cap + bt_reason + aux_coef * aux
    with torch.no_grad():
        m = {"bt_cap": float(bt_cap), "bt_reason": float(bt_reason), "aux_loss": float(aux),
             "cap_acc": float((t.cap > s.cap).float().mean()), "reason_acc": float((t.reason > s.reason).float().mean()),
             "cap_gap": float((t.cap - s.cap).mean()), "reason_gap": float((t.reason - s.reason).mean()),
             "expert_load": (0.5 * (t.expert_load + s.expert_load)).tolist()}
    return loss, m


@torch.no_grad()
def evaluate_pairs(disc: Discriminator, processor, prompts: list[Encoded], pairs: list[PairRecord],
                   batch_size: int) -> dict:
    """Held-out pair accuracy and mean teacher-minus-student gap per segment (dropout off)."""
    was = disc.training
    disc.eval()
    rows = []
    for s in range(0, len(pairs), batch_size):
        _, m = pair_batch_loss(disc, processor, prompts[s:s + batch_size], pairs[s:s + batch_size], 0.0, batch_size)
        rows.append((len(pairs[s:s + batch_size]), m))
    disc.train(was)
    n = sum(k for k, _ in rows)
    keys = ("cap_acc", "reason_acc", "cap_gap", "reason_gap", "bt_cap", "bt_reason")
    return {f"heldout_{k}": sum(k_ * m[k] for k_, m in rows) / max(n, 1) for k in keys} | {"heldout_pairs": n}


def _disc_metrics(m: dict) -> dict:
    return {f"disc/{k}": v for k, v in m.items()}


def train_warmup(cfg: WarmupConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Warm up the discriminator at ``cfg.disc.path``; returns the folder of the trained one
    (or, when halted early, of the checkpoint to resume from)."""
    run = Run(cfg, "warmup", resume=resume, desc="disc-warmup")
    disc = Discriminator.load(cfg.disc.path if run.ckpt is None else run.ckpt, run.device,
                              gradient_checkpointing=cfg.disc.gradient_checkpointing)
    disc.train()
    processor = load_processor(cfg.disc.path, cfg.data.max_pixels, cfg.data.min_pixels)
    eos, _ = special_ids(processor)
    bad = BadRecords()
    pairs = read_pairs(cfg.data.train, skip_bad=cfg.data.skip_bad, bad=bad)
    pairs = pairs[: cfg.data.limit] if cfg.data.limit else pairs
    prompts = encode_all(processor, [p.record for p in pairs], eos_id=eos, max_length=cfg.data.max_prompt_length,
                         with_response=False)
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    n_held = int(round(cfg.train.heldout_frac * len(pairs)))
    held, train = order[:n_held], order[n_held:]
    if not train:
        raise ValueError(f"{cfg.data.train}: no training pairs left after the held-out split")
    bs = cfg.train.batch_size
    steps = cfg.train.max_steps or max(1, math.ceil(len(train) * cfg.train.epochs / bs))
    # every step's pairs are a function of the seed alone, so a resumed run draws the same ones
    stream = [i for e in range(math.ceil(steps * bs / len(train)) + 1)
              for i in torch.randperm(len(train), generator=g).tolist()]
    params = [p for p in disc.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps)
    hp, hpr = [pairs[i] for i in held], [prompts[i] for i in held]
    kept = {"before": {}}   # the held-out scores before training, carried through resumes
    saved = run.track({"": disc}, processor, {"optimizer": opt, "scheduler": sched}, extra=lambda: dict(kept))
    if saved:
        kept["before"] = saved["before"]
    elif held:
        kept["before"] = evaluate_pairs(disc, processor, hpr, hp, cfg.disc.batch_size)
    before = kept["before"]
    run.begin(steps, halt_at_step, pairs=len(pairs), train_pairs=len(train), bad_records=bad.count,
              **{f"{k}_before": v for k, v in before.items()})
    t0 = time.time()
    with run:
        for step in run.steps():
            idx = [train[i] for i in stream[(step - 1) * bs: step * bs]]
            loss, m = pair_batch_loss(disc, processor, [prompts[i] for i in idx], [pairs[i] for i in idx],
                                      cfg.train.aux_coef, cfg.disc.batch_size)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if run.log_due(step):
                m.update(loss=float(loss.detach()), grad_norm=float(gnorm), lr=sched.get_last_lr()[0])
                if held and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    m.update(evaluate_pairs(disc, processor, hpr, hp, cfg.disc.batch_size))
                run.log(step, _disc_metrics(m) | {"timing/elapsed_s": time.time() - t0})
        after = {}
        if run.step == steps:
            after = evaluate_pairs(disc, processor, hpr, hp, cfg.disc.batch_size) if held else {}
            run.log(steps, {"event": "end", **_disc_metrics(after)}, force=True)
    return run.finish(lambda folder: disc.save(folder, processor),
                      {"steps": steps, "before": before, "after": after, "wall_s": time.time() - t0})
