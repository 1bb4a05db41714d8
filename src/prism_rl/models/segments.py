"""The two token segments the discriminator scores: caption, and reasoning (think + answer).

METHOD.md section 5: a response is cut where the format's caption part ends; the caption
segment is the response's tokens up to and including the one that completes ``</caption>``,
the reasoning segment is every token after it (think, answer, and the end-of-sequence token
when one was produced).

- A policy rollout is cut in the **token ids it sampled** (:func:`rollout_segments`): the
  discriminator scores exactly what the policy generated, not a re-tokenisation of its text.
- A teacher demonstration (or a warm-up pair's student side, which is stored as text) is
  rendered once as a whole response, ``caption + "\\n" + reasoning`` (the layout of the
  system prompt and of :func:`prism_rl.format.make_response`), tokenised once, closed with
  ``<|im_end|>`` as a finished rollout is, and cut by the same rule (:func:`text_segments`).
  So a teacher text and a rollout that sampled the same text's tokens give identical inputs,
  and warm-up feeds the discriminator the same form alignment does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.records import DataError
from ..format import caption_token_end
from .loading import special_ids

SEPARATOR = "\n"   # between </caption> and <think> when a response is rendered from its two parts


@dataclass(frozen=True)
class Segments:
    """Token ids (1-D, long) of one response's caption segment and reasoning segment."""

    caption: torch.Tensor
    reasoning: torch.Tensor


def split_ids(ids: Sequence[int], tokenizer) -> Segments | None:
    """Cut response token ids at the format's caption end; ``None`` if format-invalid.

    The text tested is ``tokenizer.decode(ids, skip_special_tokens=True)`` (the text the
    format regex sees for a rollout); the cut is :func:`prism_rl.format.caption_token_end`.
    """
    ids = [int(i) for i in ids]
    k = caption_token_end(ids, lambda t: tokenizer.decode(t, skip_special_tokens=True))
    if k is None:
        return None
    return Segments(torch.tensor(ids[:k], dtype=torch.long), torch.tensor(ids[k:], dtype=torch.long))


def rollout_segments(response_ids: torch.Tensor, response_mask: torch.Tensor, tokenizer) -> list[Segments | None]:
    """:func:`split_ids` of every row's sampled tokens (``response_mask`` selects them)."""
    return [split_ids(ids[m.bool()].tolist(), tokenizer) for ids, m in zip(response_ids, response_mask)]


def text_segments(processor, caption: str, reasoning: str, where: str = "response") -> Segments:
    """Segments of a response given as its two text parts (teacher, or a stored student).

    ``caption + SEPARATOR + reasoning.lstrip()`` is tokenised once and closed with
    ``<|im_end|>``, then cut by :func:`split_ids`. A pair of parts that does not form a
    format-valid response raises ``DataError`` naming ``where``.
    """
    eos, _ = special_ids(processor)
    text = caption + SEPARATOR + reasoning.lstrip()
    ids = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
    seg = split_ids(ids, processor.tokenizer)
    if seg is None:
        raise DataError(f"{where}: caption and reasoning do not form a format-valid response")
    return seg
