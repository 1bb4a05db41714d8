"""A rollout engine built for decoding: one prefill per prompt, a static KV cache, and a decode
step captured once as a CUDA graph per batch bucket.

Why: transformers' ``generate`` spends most of a decode step in Python and in kernel launches
(it ran at 6-7% of an H200's memory-bandwidth bound on a 2B model). A decode step of a dense
model has to read the text weights and the KV cache once; everything else is overhead. Here:

- **Prefill** runs the full model (vision tower included) once per prompt, without padding:
  consecutive prompts are packed into one sequence (block-diagonal causal mask, each prompt's
  own M-RoPE positions) up to ``prefill_tokens`` per forward, so a wave of 64 prompts costs a
  few forwards, not 64. Each prompt's KV entries are copied into the static cache for its ``n``
  sample rows, so 16 samples share one prefill (transformers prefills each repeated row).
- **Decode** is this module's own forward of the text decoder on one token per row, reading
  the model's own modules (projections, norms, MLP or MoE block, head), so any Qwen3-VL(-MoE)
  checkpoint works without conversion. A decode token is text, so its M-RoPE position is the
  same on all three axes and the rotary embedding reduces to the 1-D one at position
  ``p_i + t`` (``p_i`` = the prompt's largest M-RoPE position + 1). Each row writes its key and
  value at its own cache index ``L_i + t`` and attends to indices ``<= L_i + t``; grouped-query
  heads are folded into the query length (``(B, H, 1, D) -> (B, H_kv, H/H_kv, D)``), so the KV
  cache is read once per KV head.
- The **fused** path (:mod:`.fused`, default on CUDA for dense decoders) runs the same step
  over the engine's own fused weights (one QKV and one gate_up GEMM a layer, residuals in the
  GEMMs) with Triton kernels for the norms, rotary + cache write, and SiLU-mul (:mod:`.kernels`).
- On CUDA the step is captured as a CUDA graph per (batch bucket, attention-length bucket)
  and replayed: no recompilation when prompt lengths change, one launch per step.
- **Sampling** runs on the device (temperature, top-k, top-p, a seeded generator); vision
  placeholder ids are suppressed as in :class:`~prism_rl.rollout.hf.HFEngine`. On CUDA without
  top-p one Triton kernel per step draws every row's token and its log-prob in one read of the
  logits (:mod:`.sampling`: Gumbel-max on each row's counter-hash noise). The host syncs
  only every ``check_every`` steps, to stop when every row has ended and to **compact**: once
  at most half a batch bucket is still running, the running rows move to the front and the
  step continues in the smaller bucket, so finished rows stop costing. When no row is running
  at a sync the loop stops, after writing every row's tokens out (that write was once missing:
  a wave whose rows all ended before the limit came back as pad tokens, docs/RESULTS.md).
- Sampled log-probs are ``log_softmax(logits / T)`` of the unprocessed logits, as the HF engine
  returns them, and what the training forward computes.
- **Non-finite logits stop the call** (:class:`NonfiniteLogits`), checked after each wave's
  prefill and at every ``check_every`` sync: a NaN row argmaxes to token 0 (the pad token of
  Qwen's tokenizers), which decodes to an empty response, so without the check a NaN wave
  would read as a policy that answers nothing.
  The error names the records and says whether each bad prompt is finite when prefilled
  alone (then the packed prefill spread one prompt's NaN to its neighbours) and, if not,
  whether it is finite without the decode dtype's autocast (a bf16 overflow).

The same code runs eagerly on the CPU (no graphs), which is how CI tests it.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..data.processing import Encoded, collate
from ..models.loading import special_ids, vision_token_ids
from ..models.mrope import mrope_position_ids
from ..models.packing import pack_batch
from . import kernels
from .base import NAMED_RECORDS, NonfiniteLogits, Rollouts, SamplingParams, concat_rollouts, record_names, sampled_rollouts
from .fused import FusedDecoder, unfusable_reason
from .noise import prompt_keys_or_default, row_keys
from .sampling import kernel_agrees, kernel_serves, sample

ATTN_BUCKET = 256   # attention lengths are rounded up to a multiple of this (one graph each)


def _prompt_keys(params: SamplingParams, prompts: int) -> list[int] | None:
    """The prompts' noise keys of a per-row seeded call (default 0, 1, ...), else None."""
    return None if params.seed is None else prompt_keys_or_default(params.prompt_keys, prompts)


def _bucket(n: int, step: int) -> int:
    return -(-n // step) * step


def batch_buckets(rows: int) -> list[int]:
    """Batch sizes a decode step is captured for: powers of two below ``rows``, and ``rows``."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


def rope_cos_sin(rotary, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, D) of the rotary embedding at 1-D ``positions`` (B,).

    ``freqs = p * inv_freq`` (fp32), ``emb = [freqs, freqs]``, ``cos = cos(emb) * scaling``:
    the M-RoPE embedding of a text token, whose three position ids are equal.
    """
    freqs = positions[:, None].float() * rotary.inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = getattr(rotary, "attention_scaling", 1.0)
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cache_of(out):
    """The KV cache a forward with ``use_cache=True`` returned (its key differs across 5.x)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _kv_of(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) (1, H_kv, L, D) of one layer of a transformers cache (any 5.x layout)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class DecodeState:
    """Static buffers of one ``generate`` call: per-layer KV caches (rows, H_kv, T, D), and the
    step inputs (token, cache index, rotary position) and output logits of every slot."""

    def __init__(self, lm, rows: int, length: int, vocab: int, dtype, device):
        attn = lm.layers[0].self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        shape = (rows, kv_heads, length, attn.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in lm.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in lm.layers]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.cache_pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.rope_pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.rows, self.length = rows, length

    def compact(self, keep: torch.Tensor) -> None:
        """Move slots ``keep`` (1-D, ascending) to the front, in place."""
        k = int(keep.numel())
        for cache in (*self.keys, *self.values):
            cache[:k] = cache[keep]
        for buf in (self.tokens, self.cache_pos, self.rope_pos):
            buf[:k] = buf[keep]


class GraphEngine:
    """``RolloutEngine`` with a static KV cache and a CUDA-graph decode step (eager on CPU)."""

    def __init__(self, model, processor, device: torch.device | None = None, *, use_graphs: bool | None = None,
                 check_every: int = 16, decode_dtype: torch.dtype | None = None,
                 kv_budget_bytes: int | None = None, kv_fraction: float = 0.6, fused: bool | None = None,
                 split_k: bool | None = None, sample_kernel: bool | None = None, prefill_tokens: int = 8192):
        """``decode_dtype``: the dtype the decode step runs in. Default: bf16 on CUDA for a model
        held in fp32 (the trainers keep fp32 master weights), else the model's own. A different
        dtype decodes with a copy of the text weights, refreshed at every ``generate`` (so it
        always samples the current policy), as verl's rollout holds bf16 weights beside FSDP's.
        ``kv_budget_bytes`` / ``kv_fraction``: the device memory a wave's rows may hold
        (:meth:`prompts_per_wave`); a larger batch is generated in several waves.
        ``fused``: decode with :class:`~prism_rl.rollout.fused.FusedDecoder` (fused weights, few
        kernels); default on CUDA when the text decoder is dense and Triton imports; ``False``
        keeps the module path. ``split_k``: the fused path's attention is the Triton
        flash-decoding kernel (reads each row's live keys only) instead of SDPA over the bucket;
        default on wherever the fused path runs on CUDA (measured faster than SDPA on an H200:
        docs/PERFORMANCE.md, issue-13 section). ``sample_kernel``: draw tokens with the one
        Triton kernel of :mod:`.sampling` wherever no top-p applies; default on CUDA when
        Triton imports and the kernel passes its check against the torch formula on this
        device (``sampling.kernel_agrees``); ``False``: the torch ops, for comparison.
        ``prefill_tokens``: prompts are prefilled packed together up to this many tokens per
        forward (1: one at a time)."""
        self.model, self.processor = model, processor
        self.device = device or next(model.parameters()).device
        self.lm = model.model.language_model
        self.head = model.get_output_embeddings()
        if decode_dtype is None:
            on_gpu_fp32 = self.device.type == "cuda" and self.head.weight.dtype == torch.float32
            decode_dtype = torch.bfloat16 if on_gpu_fp32 else self.head.weight.dtype
        self.decode_dtype = decode_dtype
        self.fused = self._fused_decoder(fused, split_k)
        plain = self.fused is not None or decode_dtype == self.head.weight.dtype
        self.shadow = None if plain else _Shadow(self.lm, self.head, decode_dtype)
        self.eos_id, self.pad_id = special_ids(processor)
        vocab = self.head.out_features
        self.suppress_bias = torch.zeros(vocab, dtype=torch.float32, device=self.device)
        self.suppress_bias[[i for i in vision_token_ids(processor.tokenizer) if i < vocab]] = float("-inf")
        auto = self.device.type == "cuda" and kernels.triton is not None and kernel_agrees(self.device)
        self.sample_kernel = auto if sample_kernel is None else sample_kernel
        self.prefill_tokens = prefill_tokens
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.check_every = check_every
        self.kv_budget_bytes, self.kv_fraction = kv_budget_bytes, kv_fraction
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.state: DecodeState | None = None
        self.pool = None
        self.capture_s = 0.0
        self.image_token_id = getattr(model.config, "image_token_id", None)
        vision = getattr(model.config, "vision_config", None)
        self.merge = getattr(vision, "spatial_merge_size", 2)

    def _fused_decoder(self, fused: bool | None, split_k: bool | None) -> FusedDecoder | None:
        reason = unfusable_reason(self.lm)
        if fused is None:
            fused = self.device.type == "cuda" and reason is None and kernels.triton is not None
        if split_k is None:
            split_k = bool(fused) and self.device.type == "cuda"
        if split_k and not fused:
            raise ValueError("split_k attention is a kernel of the fused decode path: it needs fused=True")
        if split_k and self.device.type != "cuda" and not kernels.INTERPRET:
            raise ValueError("split_k attention is a Triton kernel: it needs CUDA (or TRITON_INTERPRET=1)")
        if not fused:
            return None
        if reason is not None:
            raise ValueError(f"fused=True needs a dense Qwen3-VL text decoder: {reason}")
        return FusedDecoder(self.lm, self.head, self.decode_dtype, split_k=split_k)

    # ---------------------------------------------------------------- the decode step

    def _step(self, rows: int, attn_len: int) -> None:
        """One decode step for slots ``[0, rows)``: read ``tokens``/positions, write the KV
        entries and ``logits``. Only static buffers are touched (it is graph-captured)."""
        st = self.state
        if self.fused is not None:
            cos, sin = rope_cos_sin(self.lm.rotary_emb, st.rope_pos[:rows], self.decode_dtype)
            self.fused.step(st, rows, attn_len, cos[:, 0], sin[:, 0])
            return
        lm, head = (self.shadow.lm, self.shadow.head) if self.shadow is not None else (self.lm, self.head)
        tokens, cache_pos = st.tokens[:rows], st.cache_pos[:rows]
        h = lm.embed_tokens(tokens)[:, None]                       # (B, 1, H)
        cos, sin = rope_cos_sin(self.lm.rotary_emb, st.rope_pos[:rows], h.dtype)   # fp32 inv_freq
        visible = torch.arange(attn_len, device=h.device)[None, :] <= cache_pos[:, None]
        mask = visible[:, None, None, :]                           # (B, 1, 1, T)
        slot = torch.arange(rows, device=h.device)
        for i, layer in enumerate(lm.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_norm(a.q_proj(x).view(rows, 1, -1, a.head_dim)).transpose(1, 2)
            k = a.k_norm(a.k_proj(x).view(rows, 1, -1, a.head_dim)).transpose(1, 2)
            v = a.v_proj(x).view(rows, 1, -1, a.head_dim).transpose(1, 2)
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
            kc, vc = st.keys[i][:rows, :, :attn_len], st.values[i][:rows, :, :attn_len]
            kc[slot, :, cache_pos] = k[:, :, 0]
            vc[slot, :, cache_pos] = v[:, :, 0]
            kv_heads = kc.shape[1]
            qg = q.reshape(rows, kv_heads, -1, a.head_dim)          # grouped heads as query rows
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=a.scaling)
            h = h + a.o_proj(o.reshape(rows, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        st.logits[:rows] = head(lm.norm(h)[:, 0]).float()

    def _run_step(self, rows: int, attn_len: int) -> None:
        if not self.use_graphs:
            self._step(rows, attn_len)
            return
        key = (rows, attn_len)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(rows, attn_len)
        graph.replay()

    def _capture(self, rows: int, attn_len: int):
        """Capture the step for (rows, attn_len); the warm-up run on a side stream is required
        by CUDA graphs and its writes are undone (cache slot contents are rewritten anyway)."""
        t0 = time.perf_counter()
        saved = (self.state.tokens.clone(), self.state.cache_pos.clone(), self.state.rope_pos.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(rows, attn_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(rows, attn_len)
        for buf, old in zip((self.state.tokens, self.state.cache_pos, self.state.rope_pos), saved):
            buf.copy_(old)
        self.graphs[(rows, attn_len)] = graph
        self.capture_s += time.perf_counter() - t0
        return graph

    # ---------------------------------------------------------------- prefill

    def _state_for(self, rows: int, length: int) -> DecodeState:
        """Reuse the buffers (and so the captured graphs) when they hold ``rows`` slots of
        ``length`` positions: a smaller call (a server's batch, an eval's last one) steps in the
        first slots of the larger buffers, and keeps the graphs captured for them."""
        st = self.state
        if st is None or st.rows < rows or st.length < length:
            self.graphs.clear()     # graphs point into the old buffers and their memory pool
            self.pool, self.state = None, None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            vocab = self.head.out_features
            self.state = DecodeState(self.lm, rows, length, vocab, self.decode_dtype, self.device)
        return self.state

    def _prefill(self, prompts: list[Encoded], n: int) -> torch.Tensor:
        """Fill the cache with every prompt's KV (copied to its ``n`` slots), set positions;
        returns the logits (B, V) of each slot's first response token. Consecutive prompts of
        up to ``prefill_tokens`` tokens together go through the model as one packed sequence
        (:meth:`_prefill_packed`); a longer prompt goes alone."""
        first = torch.empty(len(prompts) * n, self.state.logits.shape[1], dtype=torch.float32, device=self.device)
        for group in self._prefill_groups(prompts):
            if len(group) == 1:
                self._prefill_one(prompts[group[0]], group[0], n, first)
            else:
                self._prefill_packed([prompts[i] for i in group], group, n, first)
        return first

    def _prefill_groups(self, prompts: list[Encoded]) -> list[list[int]]:
        """Consecutive prompts packed together up to ``prefill_tokens`` tokens (each alone when
        the model has no M-RoPE image token, whose packed positions :func:`pack_batch` builds)."""
        if self.image_token_id is None:
            return [[i] for i in range(len(prompts))]
        groups: list[list[int]] = []
        tokens = 0
        for i, p in enumerate(prompts):
            if groups and tokens + len(p) <= self.prefill_tokens:
                groups[-1].append(i)
                tokens += len(p)
            else:
                groups.append([i])
                tokens = len(p)
        return groups

    def _prefill_one(self, p: Encoded, p_i: int, n: int, first: torch.Tensor, autocast: bool = True) -> None:
        inputs = {"input_ids": p.input_ids[None], "attention_mask": torch.ones_like(p.input_ids)[None],
                  "mm_token_type_ids": p.mm_token_type_ids[None]}
        if p.pixel_values is not None:
            inputs |= {"pixel_values": p.pixel_values, "image_grid_thw": p.image_grid_thw}
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self._prefill_autocast() if autocast else nullcontext():
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        self._store_prefill(_cache_of(out), [(p_i, 0, len(p))], [self._next_position(inputs)], n)
        first[p_i * n:(p_i + 1) * n] = out.logits[0, -1].float()

    def _prefill_packed(self, ps: list[Encoded], idx: list[int], n: int, first: torch.Tensor) -> None:
        """One forward of ``ps`` packed into one sequence (``models/packing.py``: block-diagonal
        causal mask, each prompt's own M-RoPE positions), so each prompt's keys, values and
        last logits are those of its own forward, up to float rounding; the logits are taken
        at the prompts' last tokens only."""
        batch = {k: v.to(self.device) for k, v in collate(ps, self.pad_id, side="left").items()}
        packed = pack_batch(self.model, batch)
        lengths = [len(p) for p in ps]
        ends = torch.tensor(lengths).cumsum(0)
        with self._prefill_autocast():
            out = self.model(**packed, use_cache=True, logits_to_keep=(ends - 1).to(self.device))
        pos = packed["position_ids"][1:, 0]   # M-RoPE (t, h, w) ids of the packed tokens
        nxt = torch.stack([pos[:, e - ln:e].max() for e, ln in zip(ends.tolist(), lengths)]) + 1
        spans = [(p_i, e - ln, ln) for p_i, e, ln in zip(idx, ends.tolist(), lengths)]
        self._store_prefill(_cache_of(out), spans, nxt.tolist(), n)
        for j, p_i in enumerate(idx):
            first[p_i * n:(p_i + 1) * n] = out.logits[0, j].float()

    def _store_prefill(self, cache, spans: list[tuple[int, int, int]], next_pos: list[int], n: int) -> None:
        """Copy each prompt's KV span ``(prompt index, start, length)`` of the forward's cache to
        its ``n`` slots, and set their cache index and rotary position."""
        st = self.state
        for i in range(len(self.lm.layers)):
            k, v = _kv_of(cache, i)
            for p_i, start, length in spans:
                st.keys[i][p_i * n:(p_i + 1) * n, :, :length] = k[0, :, start:start + length]
                st.values[i][p_i * n:(p_i + 1) * n, :, :length] = v[0, :, start:start + length]
        for (p_i, _, length), nxt in zip(spans, next_pos):
            st.cache_pos[p_i * n:(p_i + 1) * n] = length
            st.rope_pos[p_i * n:(p_i + 1) * n] = nxt

    def _prefill_autocast(self):
        """Prefill in the decode dtype (as the trainers' bf16 autocast forward does)."""
        if self.decode_dtype == self.head.weight.dtype:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.decode_dtype)

    def _next_position(self, inputs: dict) -> int:
        """The rotary position of the first response token: the prompt's largest M-RoPE id + 1."""
        ids = inputs["input_ids"]
        if self.image_token_id is None:
            return int(ids.shape[1])
        pos = mrope_position_ids(ids, inputs["attention_mask"], inputs.get("image_grid_thw"), self.image_token_id,
                                 self.merge)
        return int(pos.max()) + 1

    # ---------------------------------------------------------------- sampling

    def _row_keys(self, params: SamplingParams, B: int) -> torch.Tensor | None:
        """(B + 1,) int64 noise keys of the wave's rows (``noise.row_key(seed, prompt key, j)``
        for sample j of each prompt; the last entry is the filler slots' spare row), or None
        when the call is not per-row seeded (``params.seed``) or is greedy."""
        if params.seed is None or params.temperature == 0:
            return None
        keys = row_keys(params.seed, params.prompt_keys, params.n)
        return torch.tensor(keys + [0], dtype=torch.int64, device=self.device)

    def _sample(self, logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None, t: int = 0,
                keys: torch.Tensor | None = None):
        """(token, log-prob of it under softmax(logits / T)) per row, all on the device, no sync
        (:func:`.sampling.sample`: one Triton kernel where ``sample_kernel`` is on and no top-p applies)."""
        return sample(logits, self.suppress_bias, params, gen, t, keys, kernel=self.sample_kernel)

    # ---------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, prompts: list[Encoded], params: SamplingParams, group_offset: int = 0) -> Rollouts:
        """Sample ``params.n`` responses per prompt. Prompts are taken in waves whose static KV
        cache fits the budget (:meth:`prompts_per_wave`), all at once when they fit."""
        per_wave = self.prompts_per_wave(prompts, params)
        was_training = self.model.training
        self.model.eval()
        parts = []
        try:
            if self.shadow is not None:
                self.shadow.refresh(self.lm, self.head)
            if self.fused is not None and self.fused.refresh(self.lm, self.head):
                self.graphs.clear()     # the policy's embedding or head moved: graphs read the old one
            keys = _prompt_keys(params, len(prompts))
            for s in range(0, len(prompts), per_wave):
                wave = params if keys is None else replace(params, prompt_keys=keys[s:s + per_wave])
                parts.append(self._wave(prompts[s:s + per_wave], wave, group_offset + s))
        finally:
            self.model.train(was_training)
        return concat_rollouts(parts, self.pad_id)

    def _wave(self, prompts: list[Encoded], params: SamplingParams, group_offset: int) -> Rollouts:
        n, B = params.n, len(prompts) * params.n
        longest = max(int(p.input_ids.numel()) for p in prompts)
        self._state_for(B, _bucket(longest + params.max_new_tokens, ATTN_BUCKET))
        logits = self._prefill(prompts, n)
        self._check_prefill(logits, prompts, n)
        resp, lps = self._decode(logits, B, longest, params, prompts)
        return self._rollouts(prompts, params, resp, lps, group_offset)

    def _check_prefill(self, first: torch.Tensor, prompts: list[Encoded], n: int) -> None:
        """Raise :class:`NonfiniteLogits` when any prompt's first-token logits are not finite,
        after prefilling the first few bad prompts alone to tell the two causes apart (this
        overwrites their cache slots, which the raise makes moot)."""
        bad = (~torch.isfinite(first).all(-1)).view(len(prompts), n)[:, 0].nonzero()[:, 0].tolist()
        if not bad:
            return
        alone = torch.empty(n, first.shape[1], dtype=torch.float32, device=self.device)
        named = bad[:NAMED_RECORDS]
        finite_alone = []
        for i in named:
            self._prefill_one(prompts[i], 0, n, alone)
            finite_alone.append(bool(torch.isfinite(alone).all()))
        cause = ("each is finite prefilled alone: the packed prefill spread a non-finite value from a neighbour"
                 if all(finite_alone) else
                 f"{len(finite_alone) - sum(finite_alone)} of them stay non-finite prefilled alone: the policy's own "
                 f"forward overflows on them{self._own_dtype_note(prompts[named[finite_alone.index(False)]], n, alone)}")
        raise NonfiniteLogits(f"first-token logits are NaN/inf for {len(bad)} of the wave's {len(prompts)} prompts "
                              f"(records {record_names([prompts[i] for i in bad])}); {cause}. "
                              f"{self._weights_note()}")

    def _own_dtype_note(self, prompt: Encoded, n: int, buf: torch.Tensor) -> str:
        """Where the prefill runs under autocast: whether ``prompt`` is finite in the weights' own
        dtype (a low-precision overflow) or not."""
        own = self.head.weight.dtype
        if self.decode_dtype == own:
            return ""
        self._prefill_one(prompt, 0, n, buf, autocast=False)
        if bool(torch.isfinite(buf).all()):
            return f" in {_dtype_name(self.decode_dtype)} only (the first is finite in {_dtype_name(own)})"
        return f" (the first also in {_dtype_name(own)})"

    def _weights_note(self) -> str:
        """Whether the policy's parameters are finite (a diverged update vs a forward overflow)."""
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            return f"{len(bad)} parameter tensors hold NaN/inf (e.g. {', '.join(bad[:3])}): the update diverged"
        return (f"Every parameter is finite; the forward ran in {_dtype_name(self.decode_dtype)} "
                "(an overflow there, or an engine fault)")

    def row_bytes(self, prompts: list[Encoded], params: SamplingParams) -> int:
        """Device bytes one sample row holds during a call: its KV cache over the bucketed
        length (``2 x layers x kv_heads x head_dim x dtype bytes`` a token), its logits row
        and its token / log-prob record."""
        attn = self.lm.layers[0].self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        per_token = 2 * len(self.lm.layers) * kv_heads * attn.head_dim * torch.finfo(self.decode_dtype).bits // 8
        longest = max(int(p.input_ids.numel()) for p in prompts)
        total = _bucket(longest + params.max_new_tokens, ATTN_BUCKET)
        return total * per_token + 4 * self.head.out_features + 12 * params.max_new_tokens

    def prompts_per_wave(self, prompts: list[Encoded], params: SamplingParams) -> int:
        """How many prompts (with their ``n`` rows each) one wave takes: all of them unless the
        rows would need more than the budget, ``kv_budget_bytes`` or, on CUDA, ``kv_fraction``
        of the device memory that is free plus what this engine already holds."""
        budget = self.kv_budget_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            held = 0 if self.state is None else sum(t.numel() * t.element_size()
                                                    for t in (*self.state.keys, *self.state.values, self.state.logits))
            budget = int(self.kv_fraction * (free + held))
        if budget is None:
            return len(prompts)
        need = self.row_bytes(prompts, params) * params.n
        if need > budget:
            raise RuntimeError(f"one prompt's {params.n} samples need {need / 2**30:.1f} GiB of KV cache "
                               f"(prompt + {params.max_new_tokens} new tokens), over the engine's budget of "
                               f"{budget / 2**30:.1f} GiB; lower rollout.n or rollout.max_new_tokens")
        return max(1, min(len(prompts), budget // need))

    def _decode(self, logits: torch.Tensor, B: int, longest: int, params: SamplingParams,
                prompts: list[Encoded] | None = None):
        """The decode loop: sample, record, stop finished rows, compact, step. At each host sync
        the running rows' logits must be finite (else :class:`NonfiniteLogits`).

        Per step the loop touches only slot-ordered buffers with plain slices (no indexed
        writes, which sync the host): ``slots.tokens[:rows, t]``, ``slots.done[:rows]``. Every
        slot's cache index is its prompt length plus the step, so the longest attended length
        (``longest + t + 1``) picks the attention bucket on the host without a sync.
        """
        st = self.state
        seed = int(torch.randint(0, 2**62, (1,)).item())   # from the global RNG: seeded runs repeat
        gen = torch.Generator(device=self.device).manual_seed(seed)
        slots = _Slots(B, params.max_new_tokens, self.pad_id, self.device)
        keys = self._row_keys(params, B)   # per-row seeded sampling: each slot's key, by its original row
        if keys is None and params.temperature > 0 and kernel_serves(params, self.sample_kernel):
            # unseeded sampling through the kernel: each row a random key for this wave, drawn from gen
            keys = torch.randint(0, 2**32, (B + 1,), generator=gen, device=self.device)
        rows, buckets = B, batch_buckets(B)
        for t in range(params.max_new_tokens):
            tok, lp = self._sample(logits[:rows], params, gen, t, None if keys is None else keys[slots.row[:rows]])
            live = ~slots.done[:rows]
            slots.tokens[:rows, t] = torch.where(live, tok, self.pad_id)
            if lp is not None:
                slots.logprobs[:rows, t] = torch.where(live, lp, 0.0)
            slots.done[:rows] |= tok == self.eos_id
            if t + 1 == params.max_new_tokens:
                break
            st.tokens[:rows] = tok
            if (t + 1) % self.check_every == 0:
                self._check_decode(logits[:rows], slots, rows, t, params.n, prompts)
                rows = self._maybe_compact(rows, slots, buckets)
                if rows == 0:
                    break
            attn_len = min(_bucket(longest + t + 1, ATTN_BUCKET), st.length)
            self._run_step(rows, attn_len)
            st.cache_pos[:rows] += 1
            st.rope_pos[:rows] += 1
            logits = st.logits
        return slots.result(rows)

    def _check_decode(self, logits: torch.Tensor, slots: _Slots, rows: int, t: int, n: int,
                      prompts: list[Encoded] | None) -> None:
        """Raise :class:`NonfiniteLogits` when a running row's logits at step ``t`` are not finite
        (rows that have ended may hold anything: their tokens are no longer kept)."""
        bad = (~slots.done[:rows] & ~torch.isfinite(logits).all(-1)).nonzero()[:, 0]
        if bad.numel() == 0:
            return
        orig = slots.row[bad].tolist()
        named = "" if prompts is None else f" (records {record_names([prompts[r // n] for r in orig])})"
        raise NonfiniteLogits(f"logits turned NaN/inf at decode step {t} for {len(orig)} of {rows} running "
                              f"rows{named}, whose prefill was finite. {self._weights_note()}")

    def _maybe_compact(self, rows: int, slots: _Slots, buckets: list[int]) -> int:
        """At a host sync: the number of slots to keep stepping (0 = all rows ended, their
        tokens written out first: the loop stops and ``result(0)`` writes nothing more)."""
        live = (~slots.done[:rows]).nonzero()[:, 0]
        k = int(live.numel())
        if k == 0:
            slots.flush(rows)
            return 0
        target = next(b for b in buckets if b >= k)
        if target > rows // 2 or target == rows:
            return rows
        slots.compact(rows, live, target)
        self.state.compact(live)
        return target

    def _rollouts(self, prompts: list[Encoded], params: SamplingParams, resp: torch.Tensor, lps: torch.Tensor,
                  group_offset: int) -> Rollouts:
        rows = [p for p in prompts for _ in range(params.n)]
        return sampled_rollouts(rows, collate(rows, self.pad_id, side="left"), resp,
                                lps if params.return_logprobs else None, n=params.n, group_offset=group_offset,
                                eos_id=self.eos_id, pad_id=self.pad_id, tokenizer=self.processor.tokenizer,
                                extras={"capture_s": self.capture_s})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Shadow:
    """The text decoder and output head in the decode dtype: a copy whose parameters are
    overwritten from the policy's (one cast-copy of the text weights, ~ms) before each
    ``generate``. The rotary ``inv_freq`` is read from the policy, in fp32."""

    def __init__(self, lm, head, dtype: torch.dtype):
        self.lm = copy.deepcopy(lm).to(dtype).eval()
        self.head = torch.nn.Linear(head.in_features, head.out_features, bias=False,
                                    device=head.weight.device, dtype=dtype)
        for p in (*self.lm.parameters(), self.head.weight):
            p.requires_grad_(False)

    @torch.no_grad()
    def refresh(self, lm, head) -> None:
        for mine, theirs in zip(self.lm.parameters(), lm.parameters(), strict=True):
            mine.copy_(theirs)
        self.head.weight.copy_(head.weight)


class _Slots:
    """The decode loop's per-slot record: tokens, log-probs, done flags and the original row of
    each slot. Rows leave the slots at compaction; ``out`` (one spare row at index ``B`` for the
    filler slots of a bucket) holds every row's record once it has been flushed."""

    def __init__(self, B: int, steps: int, pad_id: int, device):
        self.tokens = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(B, steps, dtype=torch.float32, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.row = torch.arange(B, device=device)
        self.out_tokens = torch.full((B + 1, steps), pad_id, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(B + 1, steps, dtype=torch.float32, device=device)
        self.spare = B

    def flush(self, rows: int) -> None:
        self.out_tokens[self.row[:rows]] = self.tokens[:rows]
        self.out_logprobs[self.row[:rows]] = self.logprobs[:rows]

    def compact(self, rows: int, live: torch.Tensor, target: int) -> None:
        """Flush every slot, move the ``live`` ones to the front, mark ``[k, target)`` as
        finished filler slots that write to the spare row."""
        self.flush(rows)
        k = int(live.numel())
        for buf in (self.tokens, self.logprobs, self.row):
            buf[:k] = buf[live].clone()
        self.done[:k] = False
        self.done[k:target] = True
        self.row[k:target] = self.spare

    def result(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.flush(rows)
        return self.out_tokens[:self.spare], self.out_logprobs[:self.spare]
