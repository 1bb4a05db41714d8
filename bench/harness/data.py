"""Benchmark inputs: synthetic problems with 448 px images, as prism prompts, as TRL rows, and as
synthetic rollouts (random response tokens of chosen lengths) for the training-only measurements."""

from __future__ import annotations

import io

import torch

from prism_rl.data.processing import Encoded, collate, encode_prompt
from prism_rl.data.records import IMAGE_PLACEHOLDER, ImageRef, Record
from prism_rl.rollout.base import Rollouts


def records(n: int, image_size: int = 448, seed: int = 0) -> list[Record]:
    """``n`` problems of ``prism data synth`` (families in turn), each one ``image_size``^2 image."""
    from prism_rl.data.synth import FAMILIES, make_problem
    from prism_rl.format import SYSTEM_PROMPT
    out = []
    for i in range(n):
        p, _ = make_problem(i, seed, FAMILIES[i % len(FAMILIES)], image_size=image_size)
        out.append(Record(id=p.pid, messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": IMAGE_PLACEHOLDER + p.query.question}],
                          images=[ImageRef(data=p.image)], ground_truth=p.ground_truth, task=p.family))
    return out


def prompts(processor, n: int, image_size: int = 448, seed: int = 0) -> list[Encoded]:
    """``records`` encoded by the real processor, as ``prism rl`` encodes them."""
    return [encode_prompt(processor, r) for r in records(n, image_size, seed)]


def trl_rows(recs: list[Record]) -> list[dict]:
    """The same problems as TRL's conversational rows: ``prompt`` messages and an ``image``."""
    from PIL import Image
    rows = []
    for r in recs:
        msgs = [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, "")} for m in r.messages]
        rows.append({"prompt": msgs, "image": Image.open(io.BytesIO(r.images[0].data)).convert("RGB"),
                     "ground_truth": r.ground_truth})
    return rows


def response_lengths(rows: int, longest: int, seed: int = 0) -> list[int]:
    """Lengths spread evenly over [longest/2, longest], shuffled: rollouts of mixed length."""
    if rows == 1:
        return [longest]
    lens = [longest // 2 + round(i * (longest - longest // 2) / (rows - 1)) for i in range(rows)]
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lens[i] for i in perm]


def synth_rollouts(processor, enc: list[Encoded], n: int, lengths: list[int], vocab: int, seed: int = 0) -> Rollouts:
    """``Rollouts`` of each prompt repeated ``n`` times with random response tokens of ``lengths``.

    Tokens are drawn from ids >= 16 (Qwen's special and vision tokens come first), so no response
    holds an image placeholder. The layout is the engines': prompt left-padded, response right-padded.
    """
    from prism_rl.models.loading import special_ids, vision_token_ids
    _, pad = special_ids(processor)
    if any(v >= 16 for v in vision_token_ids(processor.tokenizer)):
        raise ValueError("vision token ids above 15: random responses could hold image placeholders")
    rows = [e for e in enc for _ in range(n)]
    if len(lengths) != len(rows):
        raise ValueError(f"{len(lengths)} response lengths for {len(rows)} rows")
    batch = collate(rows, pad, side="left")
    g = torch.Generator().manual_seed(seed)
    R = max(lengths)
    resp = torch.randint(16, vocab, (len(rows), R), generator=g)
    mask = (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).long()
    resp = resp.masked_fill(mask == 0, pad)
    return Rollouts(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], prompt_mm_types=batch["mm_token_type_ids"],
        response_ids=resp, response_mask=mask, group_ids=torch.arange(len(enc)).repeat_interleave(n),
        texts=[""] * len(rows), finish_reasons=["length"] * len(rows), records=[e.record for e in rows],
        pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
        extras={"patches_per_row": [0 if e.pixel_values is None else int(e.pixel_values.shape[0]) for e in rows],
                "images_per_row": [0 if e.image_grid_thw is None else int(e.image_grid_thw.shape[0]) for e in rows]})
