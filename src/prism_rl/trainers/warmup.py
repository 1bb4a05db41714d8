"""Discriminator warm-up: teach the MoE discriminator to prefer teacher segments.

Each pair gives a caption pair and a reasoning pair (teacher vs student, same prompt). Loss
per optimizer step of B pairs (METHOD.md section 5), one Bradley-Terry mean over all 2B
segment pairs plus the router's load-balancing loss:

    L = (1/2B) sum_i [-log sigma(T_i^cap - S_i^cap) - log sigma(T_i^reason - S_i^reason)]
        + aux_coef * load_balancing_loss

computed in chunks of pairs, each chunk's share backpropagated at once, so a batch of 128
pairs never holds 512 sequences' activations. Both sides of a pair are turned into token
segments by ``models.segments.text_segments``, the form alignment feeds for a teacher and for
a rollout that sampled the same text, so warm-up trains on the inputs alignment scores.

Pairs come from a JSONL in the reference layout, or are built here by sampling the SFT policy
on the alignment prompts (``sample_pairs``). A held-out split reports pair accuracy and the
mean teacher-minus-student gap per segment. Checkpoints resume exactly, like every stage's.
Under torchrun the discriminator is sharded (FSDP2) and each rank scores an equal share of
every step's pairs, with the global pair count as B (:func:`pair_batch_step`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import algorithms as A
from .. import distributed as D
from ..actor import NonfiniteGuard
from ..config import ConfigError, ModelConfig, WarmupConfig, WarmupDataConfig, rl_response_limit
from ..data.images import configure_images
from ..data.layouts import PairRecord, read_pairs, write_pairs
from ..data.processing import Encoded, encode_prompt_checked, load_prompts, skip_or_raise
from ..data.records import BadRecords, DataError
from ..format import split_text
from ..models.discriminator import Discriminator, SegmentScores, score_segments
from ..models.loading import load_policy, load_processor, pick_device, special_ids
from ..models.segments import Segments, text_segments
from ..rollout import make_engine
from ..rollout.base import SamplingParams
from .optim import build_optimizer, build_scheduler
from .run import Run, check_cpu_offload
from .stage_disc import load_stage_disc, save_disc


def sample_pairs(policy_dir: str, data: str, out: str, *, n: int = 1, max_new_tokens: int | None = None,
                 temperature: float = 1.0, limit: int | None = None, seed: int = 0,
                 batch_prompts: int = 32) -> dict:
    """Sample the policy on ``data`` (which carries teacher fields) and write warm-up pairs.

    Format-invalid student responses cannot be split into segments: they are skipped and
    counted in the returned stats (and never silently dropped); ``student_truncated`` counts
    the samples that hit ``max_new_tokens`` (default RLVR's response limit, so long students
    are not cut into invalid ones).
    """
    max_new_tokens = max_new_tokens if max_new_tokens is not None else rl_response_limit()
    torch.manual_seed(seed)
    model, processor = load_policy(ModelConfig(path=policy_dir), pick_device(), trainable=False)
    eos, _ = special_ids(processor)
    prompts = load_prompts(data, processor, eos_id=eos, max_length=100_000, limit=limit)
    missing = [(p.record, k) for p in prompts for k in ("teacher_caption", "teacher_cot")
               if not isinstance(p.record.extra.get(k), str)]
    if missing:
        rec, key = missing[0]
        n_rec = len({id(r) for r, _ in missing})
        raise DataError(f"{rec.where(key)}: missing; warm-up pairs pair the policy's segments with the teacher's "
                        f"(teacher_caption and teacher_cot, as in the alignment set); {n_rec} of {len(prompts)} "
                        "records lack them")
    engine = make_engine("auto", model, processor)   # the graph engine on CUDA
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    pairs, invalid, truncated = [], 0, 0
    for s in tqdm(range(0, len(prompts), batch_prompts), desc="pairs", dynamic_ncols=True):
        ro = engine.generate(prompts[s:s + batch_prompts], params)
        truncated += ro.finish_reasons.count("length")
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
             "invalid_student_skipped": invalid, "student_truncated": truncated, "max_new_tokens": max_new_tokens}
    Path(out).with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    return stats


@dataclass
class PairInput:
    """A warm-up pair as the discriminator sees it: the encoded prompt and both token segments."""

    prompt: Encoded
    teacher: Segments
    student: Segments

    def _segs(self) -> tuple[torch.Tensor, ...]:
        return self.teacher.caption, self.teacher.reasoning, self.student.caption, self.student.reasoning

    def longest(self) -> int:
        return len(self.prompt) + max(int(x.numel()) for x in self._segs())

    def tokens(self) -> int:
        """Tokens of the four sequences the pair feeds (its cost when pairs are shared out)."""
        return 4 * len(self.prompt) + sum(int(x.numel()) for x in self._segs())


def pair_inputs(processor, pairs: list[PairRecord], data: WarmupDataConfig, eos_id: int,
                bad: BadRecords) -> list[PairInput]:
    """Encode every pair; one over ``data.max_prompt_length`` (prompt) or ``data.max_length``
    (prompt + a segment), or whose parts are not a format-valid response, raises ``DataError``
    naming it, or is skipped and counted under ``data.skip_bad``."""
    out = []
    for p in pairs:
        try:
            prompt = encode_prompt_checked(processor, p.record, data.max_prompt_length)
            item = PairInput(prompt, text_segments(processor, p.teacher_caption, p.teacher_cot, p.record.where("teacher_cot")),
                             text_segments(processor, p.student_caption, p.student_cot, p.record.where("student_cot")))
            if item.longest() > data.max_length:
                raise DataError(f"{p.record.where()}: prompt + segment is {item.longest()} tokens, over "
                                f"data.max_length={data.max_length}")
            out.append(item)
        except DataError as e:
            skip_or_raise(p.record, e, data.skip_bad, bad)
    return out


def warmup_loss(t: SegmentScores, s: SegmentScores, aux: torch.Tensor, aux_coef: float, total_pairs: int) -> torch.Tensor:
    """This chunk's share of the step loss: ``(1/2B) sum_chunk [bt_cap + bt_reason] + aux_coef *
    (b/B) * aux``, with ``B = total_pairs`` the step's pairs and ``b`` the chunk's (chunk
    shares sum to the loss in the module docstring, the aux term weighted by pairs)."""
    nll = -F.logsigmoid(t.cap - s.cap) - F.logsigmoid(t.reason - s.reason)
    return nll.sum() / (2 * total_pairs) + aux_coef * aux * (len(nll) / total_pairs)


def pair_metrics(t_cap, s_cap, t_reason, s_reason, aux: float, loads: list) -> dict:
    """Per-segment Bradley-Terry means, accuracies (T > S) and mean gaps T - S over the pairs given."""
    with torch.no_grad():
        return {"bt_cap": float(A.bradley_terry_loss(t_cap, s_cap)), "bt_reason": float(A.bradley_terry_loss(t_reason, s_reason)),
                "aux_loss": aux, "cap_acc": float((t_cap > s_cap).float().mean()),
                "reason_acc": float((t_reason > s_reason).float().mean()), "cap_gap": float((t_cap - s_cap).mean()),
                "reason_gap": float((t_reason - s_reason).mean()),
                "expert_load": torch.stack(loads).mean(0).tolist() if loads else []}


def pair_batch_step(disc: Discriminator, processor, items: list[PairInput], aux_coef: float, batch_size: int,
                    backward: bool, real: int | None = None) -> tuple[float, dict]:
    """Score a batch of pairs chunk by chunk (``batch_size`` sequences per forward), and
    backpropagate each chunk's share of the loss when ``backward``; returns (loss, metrics).

    Under torchrun each rank scores an equal, token-balanced share of ``items``
    (:func:`distributed.my_share`); the normaliser B of :func:`warmup_loss` is the global pair
    count and each chunk's loss is multiplied by ``grad_scale`` (N), so FSDP2's gradient average
    is the one-process gradient. The loss, scores and expert loads are summed over ranks, so the
    metrics are the global batch's. ``real``: only the first ``real`` items count in the
    metrics (the rest are repeats that make the count divide by the ranks)."""
    share = sorted(D.my_share([it.tokens() for it in items]), key=lambda i: items[i].longest())
    per_chunk = max(1, batch_size // 2)     # each pair feeds 2 teacher and 2 student sequences
    mine, total, aux_sum = [], 0.0, 0.0
    load_sum, n_loads = None, 0
    for c in range(0, len(share), per_chunk):
        rows = share[c:c + per_chunk]
        prompts = [items[i].prompt for i in rows]
        t = score_segments(disc, processor, prompts, [items[i].teacher for i in rows], batch_size=batch_size)
        s = score_segments(disc, processor, prompts, [items[i].student for i in rows], batch_size=batch_size)
        aux = 0.5 * (t.aux_loss + s.aux_loss)
        loss = warmup_loss(t, s, aux, aux_coef, len(items))
        if backward:
            (loss * D.grad_scale()).backward()     # FSDP2 averages over ranks: scale to the sum
        total += float(loss.detach())
        mine.append(torch.stack([t.cap, s.cap, t.reason, s.reason], 1).detach())
        aux_sum += float(aux.detach()) * len(rows) / len(items)
        for load in (t.expert_load, s.expert_load):
            load_sum = load.detach().cpu().double() if load_sum is None else load_sum + load.detach().cpu()
            n_loads += 1
    return _global_pair_metrics(mine, share, len(items), real, total, aux_sum, load_sum, n_loads)


def _global_pair_metrics(mine: list[torch.Tensor], share: list[int], n_items: int, real: int | None, total: float,
                         aux_sum: float, load_sum: torch.Tensor | None, n_loads: int) -> tuple[float, dict]:
    """(loss, metrics) of the whole batch from this rank's chunks: the score table gathered in
    item order (``distributed.gather_rows``), loss and pair-weighted aux summed over ranks, the
    expert load the mean over every rank's scoring passes."""
    table = D.gather_rows(torch.cat(mine) if mine else torch.zeros(0, 4), share, n_items)[:real].float()
    experts = 0 if load_sum is None else load_sum.numel()
    sums = D.all_reduce_sum(total, aux_sum, n_loads, *(load_sum.tolist() if experts else []))
    total, aux_sum, n_loads = sums[0], sums[1], sums[2]
    loads = [torch.tensor(sums[3:]) / n_loads] if experts and n_loads else []
    return total, pair_metrics(*table.unbind(1), aux=aux_sum, loads=loads)


@torch.no_grad()
def evaluate_pairs(disc: Discriminator, processor, items: list[PairInput], batch_size: int) -> dict:
    """Held-out pair accuracy and mean teacher-minus-student gap per segment (dropout off).
    Under torchrun the ranks score shares of the pairs (padded with repeats to a multiple of
    the number of ranks, which the metrics leave out)."""
    was = disc.training
    disc.eval()
    padded = [items[i % len(items)] for i in range(len(items) + -len(items) % D.world())] if items else items
    _, m = pair_batch_step(disc, processor, padded, 0.0, batch_size, backward=False, real=len(items))
    D.reshard(disc)   # free the root's gathered weights before the next forward with gradients
    disc.train(was)
    keys = ("cap_acc", "reason_acc", "cap_gap", "reason_gap", "bt_cap", "bt_reason")
    return {f"heldout_{k}": m[k] for k in keys} | {"heldout_pairs": len(items)}


def _disc_metrics(m: dict) -> dict:
    return {f"disc/{k}": v for k, v in m.items()}


def check_distributed(cfg: WarmupConfig) -> None:
    """Under torchrun every rank scores an equal share of each step's pairs (the forwards are
    collective), so ``train.batch_size`` must split evenly over the processes."""
    if D.world() > 1 and cfg.train.batch_size % D.world():
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the number of processes "
                          f"({D.world()}): each rank scores the same number of pairs per step")


def train_warmup(cfg: WarmupConfig, resume: bool = False, halt_at_step: int | None = None) -> Path:
    """Warm up the discriminator at ``cfg.disc.path``; returns the folder of the trained one
    (or, when halted early, of the checkpoint to resume from)."""
    run = Run(cfg, "warmup", resume=resume, desc="disc-warmup")
    check_distributed(cfg)
    check_cpu_offload(cfg.disc, "disc")
    disc = load_stage_disc(cfg.disc.path, run.device, resume_from=run.ckpt,
                           gradient_checkpointing=cfg.disc.gradient_checkpointing, cpu_offload=cfg.disc.cpu_offload)
    processor = load_processor(cfg.disc.path, cfg.data.max_pixels, cfg.data.min_pixels)
    configure_images(cfg.data)
    eos, _ = special_ids(processor)
    bad = BadRecords()
    pairs = read_pairs(cfg.data.train, skip_bad=cfg.data.skip_bad, bad=bad)
    pairs = pair_inputs(processor, pairs[: cfg.data.limit] if cfg.data.limit else pairs, cfg.data, eos, bad)
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    n_held = int(round(cfg.train.heldout_frac * len(pairs)))
    held, train = order[:n_held], order[n_held:]
    if not pairs:
        raise DataError(f"{cfg.data.train}: no warm-up pairs ({bad.summary()})")
    if not train:
        raise DataError(f"{cfg.data.train}: no training pairs left after the held-out split "
                        f"({len(pairs)} pairs read, train.heldout_frac={cfg.train.heldout_frac})")
    bs = cfg.train.batch_size
    steps = cfg.train.max_steps or max(1, math.ceil(len(train) * cfg.train.epochs / bs))
    # every step's pairs are a function of the seed alone, so a resumed run draws the same ones
    stream = [i for e in range(math.ceil(steps * bs / len(train)) + 1)
              for i in torch.randperm(len(train), generator=g).tolist()]
    params = [p for p in disc.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps)
    held_pairs = [pairs[i] for i in held]
    kept = {"before": {}}   # the held-out scores before training, carried through resumes
    saved = run.track({"": disc}, processor, {"optimizer": opt, "scheduler": sched}, extra=lambda: dict(kept))
    if saved:
        kept["before"] = saved["before"]
    elif held:
        kept["before"] = evaluate_pairs(disc, processor, held_pairs, cfg.disc.batch_size)
    before = kept["before"]
    run.begin(steps, halt_at_step, pairs=len(pairs), train_pairs=len(train), bad_records=bad.count,
              **{f"{k}_before": v for k, v in before.items()})
    t0 = time.time()
    guard = NonfiniteGuard(run.out)
    with run:
        for step in run.steps():
            idx = [train[i] for i in stream[(step - 1) * bs: step * bs]]
            loss, m = pair_batch_step(disc, processor, [pairs[i] for i in idx], cfg.train.aux_coef,
                                      cfg.disc.batch_size, backward=True)
            gnorm = D.clip_grad_norm(params, cfg.optim.grad_clip)   # torchrun: the norm over all shards
            if guard.step_ok(step, loss, gnorm):   # a NaN/inf step is skipped; three in a row stop the run
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if run.log_due(step):
                m.update(loss=loss, grad_norm=float(gnorm), lr=sched.get_last_lr()[0])
                if held and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    m.update(evaluate_pairs(disc, processor, held_pairs, cfg.disc.batch_size))
                run.log(step, _disc_metrics(m) | {"timing/elapsed_s": time.time() - t0})
        after = {}
        if run.step == steps:
            after = evaluate_pairs(disc, processor, held_pairs, cfg.disc.batch_size) if held else {}
            run.log(steps, {"event": "end", **_disc_metrics(after)}, force=True)
        return run.finish(lambda folder: save_disc(folder, disc, processor),
                          {"steps": steps, "before": before, "after": after, "wall_s": time.time() - t0})
