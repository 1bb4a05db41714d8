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


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0   # 0 -> greedy
    top_p: float = 1.0
    return_logprobs: bool = False


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

    def select(self, rows: list[int]) -> "Rollouts":
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


class RolloutEngine(Protocol):
    def generate(self, prompts: list[Encoded], params: SamplingParams, group_offset: int = 0) -> Rollouts:
        """Sample ``params.n`` responses for each prompt; group ids start at ``group_offset``."""
        ...
