"""The rollout container and the engine interface every generation backend implements.

An engine takes encoded prompts (with their images) and returns, for each prompt, ``n``
sampled responses as one ``Rollouts`` batch: token ids and masks in the training layout
``[prompt (left-padded) | response (right-padded)]``, optional sampling log-probs, finish
reasons, decoded text and group ids (one group per prompt). Trainers only see this type, so
a faster engine drops in by implementing ``RolloutEngine.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..data.processing import Encoded
from ..data.records import Record

NAMED_RECORDS = 4   # records a NonfiniteLogits message names


class NonfiniteLogits(FloatingPointError):
    """The policy's logits were NaN or inf for some rows of a rollout wave: raised instead of
    sampling from them (greedy or sampled, a NaN row yields token 0 every step)."""


def record_names(prompts: list[Encoded]) -> str:
    """The first ``NAMED_RECORDS`` prompts' record ids (source file and index where a record has
    no id), and how many more there are: the records a :class:`NonfiniteLogits` names."""
    names = []
    for p in prompts[:NAMED_RECORDS]:
        rec = getattr(p, "record", None)
        names.append(str(getattr(rec, "id", None) or f"{getattr(rec, 'source', '?')}#{getattr(rec, 'index', '?')}"))
    more = len(prompts) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0   # 0 -> greedy
    top_p: float = 1.0
    return_logprobs: bool = False
    # per-row seeded sampling (``rollout/noise.py``): each response draws from its own noise
    # stream, keyed by ``seed`` and its prompt's place in the global batch (``prompt_keys``,
    # default 0, 1, ...), so the samples do not depend on the batch or the number of processes
    seed: int | None = None
    prompt_keys: list[int] | None = None


@dataclass
class Rollouts:
    """``B = prompts x n`` sampled responses, grouped by prompt (``group_ids``)."""

    prompt_ids: torch.Tensor         # (B, P) left-padded
    prompt_mask: torch.Tensor        # (B, P)
    prompt_mm_types: torch.Tensor    # (B, P) mm_token_type_ids of the prompt
    response_ids: torch.Tensor       # (B, R) right-padded; includes the EOS when one was produced
    response_mask: torch.Tensor      # (B, R) 1 on response tokens (EOS included)
    group_ids: torch.Tensor          # (B,)
    texts: list[str]
    finish_reasons: list[str]        # "stop" (EOS produced) or "length"
    records: list[Record]
    pixel_values: torch.Tensor | None = None    # patches of all B rows, in row order
    image_grid_thw: torch.Tensor | None = None  # (images, 3), in row order
    logprobs: torch.Tensor | None = None        # (B, R) sampling log-probs, if asked for
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def model_batch(self) -> dict[str, torch.Tensor]:
        """The full sequences as a model batch; the response starts at column ``P``."""
        batch = {
            "input_ids": torch.cat([self.prompt_ids, self.response_ids], 1),
            "attention_mask": torch.cat([self.prompt_mask, self.response_mask], 1),
            "mm_token_type_ids": torch.cat([self.prompt_mm_types, torch.zeros_like(self.response_ids)], 1),
        }
        if self.pixel_values is not None:
            batch["pixel_values"] = self.pixel_values
            batch["image_grid_thw"] = self.image_grid_thw
        return batch

    def select(self, rows: list[int]) -> Rollouts:
        """A sub-batch of rows (with their image patches)."""
        idx = torch.tensor(rows, dtype=torch.long)
        pix, thw = None, None
        if self.pixel_values is not None:
            per_row = self.extras["patches_per_row"]
            imgs_per_row = self.extras["images_per_row"]
            p_off = torch.tensor([0] + per_row).cumsum(0)
            i_off = torch.tensor([0] + imgs_per_row).cumsum(0)
            pix = torch.cat([self.pixel_values[p_off[r]:p_off[r + 1]] for r in rows])
            thw = torch.cat([self.image_grid_thw[i_off[r]:i_off[r + 1]] for r in rows])
            if thw.shape[0] == 0:  # only text rows: no image inputs (empty ones crash the vision tower)
                pix = thw = None
        extras = dict(self.extras)
        for key in ("patches_per_row", "images_per_row"):
            if key in extras:
                extras[key] = [self.extras[key][r] for r in rows]
        return Rollouts(
            prompt_ids=self.prompt_ids[idx], prompt_mask=self.prompt_mask[idx],
            prompt_mm_types=self.prompt_mm_types[idx], response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx], group_ids=self.group_ids[idx],
            texts=[self.texts[r] for r in rows], finish_reasons=[self.finish_reasons[r] for r in rows],
            records=[self.records[r] for r in rows], pixel_values=pix, image_grid_thw=thw,
            logprobs=None if self.logprobs is None else self.logprobs[idx], extras=extras,
        )


def response_mask(resp: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row (all ones when there is none)."""
    is_eos = (resp == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).long()


def sampled_rollouts(rows: list[Encoded], batch: dict[str, torch.Tensor], resp: torch.Tensor,
                     logprobs: torch.Tensor | None, *, n: int, group_offset: int, eos_id: int, pad_id: int,
                     tokenizer, extras: dict | None = None) -> Rollouts:
    """The ``Rollouts`` of sampled responses, whichever engine sampled them.

    ``rows``: each prompt repeated ``n`` times, in row order; ``batch``: their left-padded
    ``collate``; ``resp`` (B, R): sampled ids. Each row keeps its tokens up to and including
    its first EOS (``response_mask``; the rest become ``pad_id``), the width is trimmed to the
    longest kept row, ``finish`` is "stop" for a row that produced EOS, else "length", and
    ``logprobs`` (B, R) are zeroed outside the mask.
    """
    resp = resp.cpu()
    mask = response_mask(resp, eos_id)
    width = max(1, int(mask.sum(1).max()))
    resp, mask = resp[:, :width].masked_fill(mask[:, :width] == 0, pad_id), mask[:, :width]
    finish = ["stop" if bool((r[m.bool()] == eos_id).any()) else "length" for r, m in zip(resp, mask)]
    texts = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(resp, mask)], skip_special_tokens=True)
    shapes = {"patches_per_row": [0 if e.pixel_values is None else int(e.pixel_values.shape[0]) for e in rows],
              "images_per_row": [0 if e.image_grid_thw is None else int(e.image_grid_thw.shape[0]) for e in rows]}
    return Rollouts(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"],
        prompt_mm_types=batch["mm_token_type_ids"], response_ids=resp, response_mask=mask,
        group_ids=torch.arange(len(rows) // n).repeat_interleave(n) + group_offset, texts=texts,
        finish_reasons=finish, records=[e.record for e in rows], pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        logprobs=None if logprobs is None else logprobs.cpu()[:, :width] * mask,
        extras=shapes | (extras or {}),
    )


class RolloutEngine(Protocol):
    def generate(self, prompts: list[Encoded], params: SamplingParams, group_offset: int = 0) -> Rollouts:
        """Sample ``params.n`` responses for each prompt; group ids start at ``group_offset``."""
        ...


def _repad(t: torch.Tensor, width: int, value: int, side: str) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype)
    return torch.cat([pad, t], 1) if side == "left" else torch.cat([t, pad], 1)


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Join rollout batches of different widths (prompts re-padded left, responses right)."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    R = max(p.response_ids.shape[1] for p in parts)
    cat = lambda name, w, v, side: torch.cat([_repad(getattr(p, name), w, v, side) for p in parts])
    pix = [p.pixel_values for p in parts if p.pixel_values is not None]
    extras: dict = {}
    for key in ("patches_per_row", "images_per_row"):
        extras[key] = [x for p in parts for x in p.extras.get(key, [0] * len(p))]
    lps = [p.logprobs for p in parts]
    return Rollouts(
        prompt_ids=cat("prompt_ids", P, pad_id, "left"), prompt_mask=cat("prompt_mask", P, 0, "left"),
        prompt_mm_types=cat("prompt_mm_types", P, 0, "left"),
        response_ids=cat("response_ids", R, pad_id, "right"), response_mask=cat("response_mask", R, 0, "right"),
        group_ids=torch.cat([p.group_ids for p in parts]),
        texts=[t for p in parts for t in p.texts], finish_reasons=[f for p in parts for f in p.finish_reasons],
        records=[r for p in parts for r in p.records],
        pixel_values=torch.cat(pix) if pix else None,
        image_grid_thw=torch.cat([p.image_grid_thw for p in parts if p.image_grid_thw is not None]) if pix else None,
        logprobs=None if any(x is None for x in lps) else torch.cat(
            [_repad(x, R, 0, "right") for x in lps]),
        extras=extras,
    )


def micro_batch(ro: Rollouts, rows: list[int]) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """Model batch for ``rows``, trimmed to the columns those rows use.

    Returns (batch, response_start, response_mask) with the response starting at column
    ``response_start`` of every row and ``response_mask`` of shape (len(rows), R_used).
    """
    sub = ro.select(rows)
    used_p = int(sub.prompt_mask.any(0).nonzero().min()) if sub.prompt_mask.any() else 0
    used_r = max(1, int(sub.response_mask.sum(1).max()))
    sub.prompt_ids, sub.prompt_mask, sub.prompt_mm_types = (
        sub.prompt_ids[:, used_p:], sub.prompt_mask[:, used_p:], sub.prompt_mm_types[:, used_p:])
    sub.response_ids, sub.response_mask = sub.response_ids[:, :used_r], sub.response_mask[:, :used_r]
    return sub.model_batch(), sub.prompt_ids.shape[1], sub.response_mask
