"""Rollout engine on transformers' ``generate`` (the reference engine; any HF VLM works).

Prompts are left-padded into one batch and each is repeated ``n`` times (with its image
patches) so that one ``generate`` call samples every response. EOS and pad ids come from the
processor (a fresh checkpoint's generation config may lack them). A logits processor checks
every step's logits: NaN or +inf stops the call (:class:`~.base.NonfiniteLogits`, naming the
records) instead of sampling from them (-inf is allowed: suppressed tokens carry it).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from ..data.processing import Encoded, collate
from ..models.loading import special_ids, vision_token_ids
from .base import NonfiniteLogits, Rollouts, SamplingParams, record_names, sampled_rollouts
from .noise import RowNoise, prompt_keys_or_default, row_keys


class HFEngine:
    """``RolloutEngine`` on ``model.generate``; the model is used as it is (no copy)."""

    def __init__(self, model, processor, device: torch.device | None = None,
                 cache_implementation: str | None = None):
        """``cache_implementation="static"`` preallocates the KV cache and compiles the decode
        step (faster decoding on GPU after a one-off compile; see docs/PERFORMANCE.md)."""
        self.cache_implementation = None if cache_implementation == "dynamic" else cache_implementation
        self.model = model
        self.processor = processor
        self.device = device or next(model.parameters()).device
        self.eos_id, self.pad_id = special_ids(processor)
        self.suppress_ids = vision_token_ids(processor.tokenizer)

    def _repeat(self, prompts: list[Encoded], n: int) -> list[Encoded]:
        return [p for p in prompts for _ in range(n)]

    @torch.no_grad()
    def generate(self, prompts: list[Encoded], params: SamplingParams, group_offset: int = 0) -> Rollouts:
        rows = self._repeat(prompts, params.n)
        batch = collate(rows, self.pad_id, side="left")
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        greedy = params.temperature == 0
        seeded = params.seed is not None and not greedy
        was_training = self.model.training
        self.model.eval()
        processors = LogitsProcessorList([FiniteLogits(inputs["input_ids"].shape[1])])
        if seeded:
            processors.append(self._row_noise(prompts, params, inputs))
        try:
            out = self.model.generate(
                **inputs, max_new_tokens=params.max_new_tokens, do_sample=not (greedy or seeded),
                temperature=None if greedy or seeded else params.temperature,
                top_p=None if greedy or seeded else params.top_p, top_k=None, logits_processor=processors,
                eos_token_id=self.eos_id, pad_token_id=self.pad_id, suppress_tokens=self.suppress_ids or None,
                return_dict_in_generate=True, output_logits=params.return_logprobs,
                **({"cache_implementation": self.cache_implementation} if self.cache_implementation else {}),
            )
        except NonfiniteLogits as e:
            raise NonfiniteLogits(f"{e.args[0]} (records {record_names([rows[r] for r in e.args[1]])})") from None
        finally:
            self.model.train(was_training)
        P = inputs["input_ids"].shape[1]
        resp = out.sequences[:, P:].cpu()
        logprobs = None
        if params.return_logprobs:
            logits = torch.stack(out.logits, 1).float().cpu()
            if not greedy and params.temperature != 1.0:
                logits = logits / params.temperature
            logprobs = torch.log_softmax(logits, -1).gather(-1, resp[:, :, None]).squeeze(-1)
        return sampled_rollouts(rows, batch, resp, logprobs, n=params.n, group_offset=group_offset, eos_id=self.eos_id,
                                pad_id=self.pad_id, tokenizer=self.processor.tokenizer)

    def _row_noise(self, prompts: list[Encoded], params: SamplingParams, inputs: dict) -> RowNoise:
        """Per-row seeded sampling (``noise.RowNoise``): row ``i*n + j`` (sample j of prompt i)
        keyed by ``row_key(params.seed, prompt_keys[i], j)``."""
        keys = prompt_keys_or_default(params.prompt_keys, len(prompts))
        rows = torch.tensor(row_keys(params.seed, keys, params.n), dtype=torch.int64)
        return RowNoise(rows, inputs["input_ids"].shape[1], params.temperature, params.top_p)


class FiniteLogits:
    """A ``generate`` logits processor that raises :class:`NonfiniteLogits` (message, rows) at the
    first step where a row's logits hold NaN or +inf; the scores pass through unchanged. It
    runs after transformers' own processors, so -inf (a suppressed token) is allowed."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = (torch.isnan(scores) | torch.isposinf(scores)).any(-1)
        if bool(bad.any()):   # a host sync per step; generate syncs per step anyway (stopping criteria)
            rows = bad.nonzero()[:, 0].tolist()
            raise NonfiniteLogits(f"logits turned NaN/inf at decode step {input_ids.shape[1] - self.prompt_len} "
                                  f"for {len(rows)} of {len(bad)} rows in transformers' generate", rows)
        return scores
