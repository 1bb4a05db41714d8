"""The PRISM discriminator: an upcycled Qwen3-VL-MoE backbone with a scalar value head.

Pieces (METHOD.md section 5):

- **Upcycling** (:func:`upcycle`, :func:`upcycle_model`): a dense ``Qwen3VLForConditionalGeneration``
  becomes a ``Qwen3VLMoeForConditionalGeneration`` with the same text dimensions. Every decoder
  layer's MLP becomes ``E`` experts, each a copy of the dense MLP plus N(0, noise_std) noise;
  routers are N(0, router_std); vision tower, attention, norms, embeddings and ``lm_head`` are
  copied unchanged. transformers' Qwen3-VL-MoE router always renormalises its top-k
  probabilities, ``w_j = p_j / sum_{i in top_k} p_i``, so with ``noise_std = 0`` each token's MLP
  output is ``sum_j w_j MLP(x) = MLP(x)``: the MoE model reproduces the dense model exactly.
- **Discriminator** (:class:`Discriminator`): backbone (the MoE model, or the dense model for the
  ``dense`` ablation) + ``Dropout(0.1)`` + bias-free ``Linear(hidden, 1)`` (init N(0, 0.02)) on
  the last decoder layer's (final-normed) hidden states. The score of a sequence is the value
  at its last valid token, clipped: ``s = clip(w . h_last, clip_min, clip_max)``. Vocabulary
  logits are never computed.
- **Routing**: ``"learned"`` (the reference: token-level top-k router, no expert pinned) or
  ``"segment"``: caption tokens may only use the perception half ``[0, E/2)`` of the experts and
  reasoning tokens the reasoning half ``[E/2, E)``; prompt tokens route freely. Implemented by a
  forward hook on every router that sets the forbidden router logits to ``-inf`` and redoes the
  (normalised) top-k, driven by per-token ``segment_ids``.
- **Segment scoring** (:func:`score_segments`): each response is scored twice, prompt +
  caption segment and prompt + reasoning segment (think + answer + end of sequence), on the
  token segments of :mod:`prism_rl.models.segments` (a rollout's own sampled ids).
  Scores keep their graph; wrapping a call in ``torch.no_grad()`` is the caller's choice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from ..algorithms import load_balancing_loss
from ..data.processing import Encoded, collate, pad_sequences
from .loading import autocast_for, special_ids, vision_token_ids
from .logprobs import MODEL_INPUT_KEYS
from .mrope import install_batched_rope_index
from .segments import Segments

DISC_CONFIG_NAME = "prism_discriminator.json"
VALUE_HEAD_NAME = "value_head.safetensors"
ROUTING_MODES = ("learned", "segment")
SEGMENT_FREE, SEGMENT_CAPTION, SEGMENT_REASONING = 0, 1, 2
MOE_MODEL_TYPE = "qwen3_vl_moe"
# Config keys that describe a saved object rather than the architecture.
_META_KEYS = ("model_type", "transformers_version", "architectures", "_name_or_path", "dtype")


# --------------------------------------------------------------------------- upcycling


def _arch_dict(sub_config) -> dict:
    d = sub_config.to_dict()
    for k in _META_KEYS:
        d.pop(k, None)
    return d


def moe_config_from_dense(dense_config, *, experts: int, top_k: int, aux_coef: float) -> Qwen3VLMoeConfig:
    """A ``Qwen3VLMoeConfig`` with the dense config's dimensions and every layer sparse.

    ``num_experts = experts``, ``num_experts_per_tok = top_k``, ``moe_intermediate_size`` = the
    dense ``intermediate_size``, ``decoder_sparse_step = 1``, ``mlp_only_layers = []``,
    ``router_aux_loss_coef = aux_coef``. (The Qwen3-VL-MoE router has no switch for top-k
    renormalisation: it always renormalises.)
    """
    if not 1 <= top_k <= experts:
        raise ValueError(f"need 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
    text = _arch_dict(dense_config.text_config)
    text.update(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=text["intermediate_size"], decoder_sparse_step=1,
                mlp_only_layers=[], router_aux_loss_coef=aux_coef,
                tie_word_embeddings=dense_config.tie_word_embeddings)
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=_arch_dict(dense_config.vision_config),
        image_token_id=dense_config.image_token_id,
        video_token_id=dense_config.video_token_id,
        vision_start_token_id=dense_config.vision_start_token_id,
        vision_end_token_id=dense_config.vision_end_token_id,
        tie_word_embeddings=dense_config.tie_word_embeddings,
    )


def expert_weights_from_dense(mlp, experts: int, noise_std: float,
                              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused expert tensors from a dense SwiGLU MLP, in transformers' Qwen3-VL-MoE layout.

    The dense MLP is ``down(silu(gate x) * up x)`` with ``gate, up: (I, H)`` and ``down: (H, I)``
    (``nn.Linear`` weights). ``Qwen3VLMoeTextExperts`` computes ``linear(x, gate_up_proj[e])``
    and splits the result into (gate, up) halves, then ``linear(., down_proj[e])``, so

        gate_up_proj[e] = [gate; up] + N(0, noise_std)   shape (E, 2I, H)
        down_proj[e]    = down       + N(0, noise_std)   shape (E, H, I)

    (no transposition in memory; transformers transposes to (E, H, 2I) / (E, I, H) on disk).
    """
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).float()
    down = mlp.down_proj.weight.float()
    gate_up = gate_up.unsqueeze(0).repeat(experts, 1, 1)
    down = down.unsqueeze(0).repeat(experts, 1, 1)
    if noise_std > 0:
        gate_up += noise_std * torch.randn(gate_up.shape, generator=generator)
        down += noise_std * torch.randn(down.shape, generator=generator)
    return gate_up, down


def upcycle_model(dense, *, experts: int = 4, top_k: int = 2, noise_std: float = 0.01,
                  router_std: float = 0.02, aux_coef: float = 0.01,
                  seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    """Upcycle a loaded dense Qwen3-VL model (in memory); the result has the dense model's dtype.

    Every non-MLP tensor is copied unchanged (same state-dict names in both architectures);
    each layer's experts come from :func:`expert_weights_from_dense`; routers ``(E, H)`` are
    N(0, router_std). The random draws use a generator seeded with ``seed``.
    """
    cfg = moe_config_from_dense(dense.config, experts=experts, top_k=top_k, aux_coef=aux_coef)
    moe = Qwen3VLMoeForConditionalGeneration(cfg).float()
    dense_sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k or ".visual." in k}
    missing, unexpected = moe.load_state_dict(dense_sd, strict=False)
    leftover = [k for k in missing if ".mlp.experts." not in k and ".mlp.gate." not in k]
    if leftover or unexpected:
        raise RuntimeError(f"upcycling: unmatched weights: missing {leftover}, unexpected {list(unexpected)}")
    gen = torch.Generator().manual_seed(seed)
    dense_layers = dense.model.language_model.layers
    with torch.no_grad():
        for dense_layer, layer in zip(dense_layers, moe.model.language_model.layers, strict=True):
            gate_up, down = expert_weights_from_dense(dense_layer.mlp, experts, noise_std, gen)
            layer.mlp.experts.gate_up_proj.copy_(gate_up)
            layer.mlp.experts.down_proj.copy_(down)
            w = layer.mlp.gate.weight
            w.copy_(router_std * torch.randn(w.shape, generator=gen))
    moe.generation_config = dense.generation_config
    return moe.to(dense.dtype)


def upcycle(dense_dir: str | Path, out_dir: str | Path, *, experts: int = 4, top_k: int = 2,
            noise_std: float = 0.01, router_std: float = 0.02, aux_coef: float = 0.01,
            seed: int = 0) -> Path:
    """Upcycle the dense checkpoint in ``dense_dir`` and save model + processor to ``out_dir``."""
    dense = AutoModelForImageTextToText.from_pretrained(dense_dir, dtype="auto")
    if dense.config.model_type == MOE_MODEL_TYPE:
        raise ValueError(f"{dense_dir} is already a Qwen3-VL-MoE checkpoint")
    moe = upcycle_model(dense, experts=experts, top_k=top_k, noise_std=noise_std,
                        router_std=router_std, aux_coef=aux_coef, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out)
    AutoProcessor.from_pretrained(dense_dir).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- routing


def is_moe(backbone) -> bool:
    return backbone.config.model_type == MOE_MODEL_TYPE


def allowed_experts(segment_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Boolean (N, E): which experts each token may use under segment routing.

    ``0`` (prompt / padding): all; ``1`` (caption): ``[0, E/2)``; ``2`` (reasoning): ``[E/2, E)``
    (``E/2`` rounded down).
    """
    half = num_experts // 2
    e = torch.arange(num_experts, device=segment_ids.device)
    seg = segment_ids.reshape(-1, 1)
    return (seg == SEGMENT_FREE) | ((seg == SEGMENT_CAPTION) & (e < half)) | ((seg == SEGMENT_REASONING) & (e >= half))


def route_top_k(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Qwen3-VL-MoE routing: ``p = softmax(z)`` (fp32), top-k of ``p``, and
    weights ``w_j = p_j / sum_{i in top_k} p_i``. Returns (weights in ``z``'s dtype, indices)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    top, idx = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return top.to(router_logits.dtype), idx


class _SegmentState:
    """The per-token segment ids of the forward pass in progress (``None``: route freely)."""

    segments: torch.Tensor | None = None


def _segment_router_hook(state: _SegmentState, module, args, output):
    """Forward hook on a router: mask forbidden experts' logits to -inf and redo the top-k.

    Registered with ``prepend=True``, so transformers' router-logit recorder (a later hook)
    records the masked logits: the ones the routing actually used.
    """
    if state.segments is None:
        return None
    logits = output[0]
    allowed = allowed_experts(state.segments.to(logits.device), logits.shape[-1])
    if allowed.shape[0] != logits.shape[0]:
        raise RuntimeError(f"segment_ids cover {allowed.shape[0]} tokens, the router saw {logits.shape[0]}")
    masked = logits.masked_fill(~allowed, float("-inf"))
    weights, idx = route_top_k(masked, module.top_k)
    return masked, weights, idx


def _routers(backbone) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in backbone.model.language_model.layers if hasattr(layer.mlp, "gate")]


def expert_load_from_router_logits(router_logits, attention_mask: torch.Tensor | None,
                                   top_k: int, num_experts: int) -> torch.Tensor:
    """Fraction of routed token-slots per expert, pooled over layers (sums to 1).

    ``router_logits``: one (N, E) tensor per MoE layer (N = B * L tokens, row-major), or one
    tensor. ``load_e = #{(layer, valid token, slot): top_k(z_token)_slot = e} / (layers * N_valid * k)``.
    A uniform router gives ``1/E`` each. Detached; zeros if there is no valid token.
    """
    layers = router_logits if isinstance(router_logits, (list, tuple)) else [router_logits]
    counts = torch.zeros(num_experts, dtype=torch.float32, device=layers[0].device)
    with torch.no_grad():
        valid = None if attention_mask is None else attention_mask.reshape(-1).to(layers[0].device).bool()
        for z in layers:
            idx = torch.topk(z.reshape(-1, num_experts).float(), top_k, dim=-1).indices
            if valid is not None:
                idx = idx[valid]
            counts += torch.bincount(idx.reshape(-1), minlength=num_experts).float()
    total = counts.sum()
    return counts / total if total > 0 else counts


# --------------------------------------------------------------------------- discriminator


@dataclass
class DiscOutput:
    """``scores`` (B,), clipped; ``aux_loss``: unscaled load-balancing loss (0 for dense);
    ``expert_load`` (E,): fraction of routed token-slots per expert (empty for dense);
    ``tokens``: number of valid tokens in the batch."""

    scores: torch.Tensor
    aux_loss: torch.Tensor
    expert_load: torch.Tensor
    tokens: int = 0


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last 1 in ``attention_mask`` (B, L): correct for left or right
    padding. ``argmax_t (t * m_t)``; a row with no valid token gives 0."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * pos).argmax(dim=-1)


def _checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on, without deprecated properties."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class Discriminator(torch.nn.Module):
    """Backbone + value head: ``s = clip(w . dropout(h_T), clip_min, clip_max)``.

    ``h_T`` is the last decoder layer's (final-normed) hidden state at the last valid token.
    ``variant`` ("moe" / "dense"), ``experts``, ``top_k`` and ``aux_coef`` are read from the
    backbone's config. ``text_only``: inputs must carry no image (see :func:`strip_images`).
    ``routing``: "learned" or "segment" (MoE only; needs ``top_k <= E/2``).
    """

    def __init__(self, backbone, *, text_only: bool = False, clip: tuple[float, float] = (-10.0, 10.0),
                 routing: str = "learned", dropout: float = 0.1, init_std: float = 0.02,
                 seed: int | None = None):
        super().__init__()
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, not {routing!r}")
        if clip[0] >= clip[1]:
            raise ValueError(f"clip range {clip} is empty")
        self.backbone = backbone
        self.text_only = bool(text_only)
        self.clip = (float(clip[0]), float(clip[1]))
        self.routing = routing
        text = backbone.config.get_text_config()
        self.is_moe = is_moe(backbone)
        self.experts = int(text.num_experts) if self.is_moe else 0
        self.top_k = int(text.num_experts_per_tok) if self.is_moe else 0
        self.aux_coef = float(text.router_aux_loss_coef) if self.is_moe else 0.0
        self.dropout = torch.nn.Dropout(dropout)
        self.value_head = torch.nn.Linear(text.hidden_size, 1, bias=False)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.value_head.weight.copy_(init_std * torch.randn(self.value_head.weight.shape, generator=gen))
        self.value_head.to(next(backbone.parameters()).device)
        self._segments = _SegmentState()
        self._hooks = self._attach_segment_routing() if routing == "segment" else []

    # ---- set-up

    def _attach_segment_routing(self) -> list:
        if not self.is_moe:
            raise ValueError("routing='segment' needs an MoE backbone (not the dense variant)")
        if self.top_k > self.experts // 2:
            raise ValueError(f"routing='segment' needs top_k <= experts/2 (top_k={self.top_k}, "
                             f"experts={self.experts})")
        hook = partial(_segment_router_hook, self._segments)
        return [r.register_forward_hook(hook, prepend=True) for r in _routers(self.backbone)]

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    @property
    def variant(self) -> str:
        return "moe" if self.is_moe else "dense"

    def config_dict(self) -> dict:
        """What ``prism_discriminator.json`` holds."""
        return {"variant": self.variant, "text_only": self.text_only, "clip_min": self.clip[0],
                "clip_max": self.clip[1], "routing": self.routing, "experts": self.experts,
                "top_k": self.top_k, "aux_coef": self.aux_coef, "dropout": self.dropout.p}

    # ---- forward

    def _check_inputs(self, batch: dict, segment_ids: torch.Tensor | None) -> None:
        if self.text_only and batch.get("pixel_values") is not None:
            raise ValueError("text-only discriminator got pixel_values; build its inputs with strip_images")
        if segment_ids is not None and segment_ids.shape != batch["input_ids"].shape:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} != input_ids "
                             f"{tuple(batch['input_ids'].shape)}")
        if self.routing == "segment" and segment_ids is not None and torch.is_grad_enabled() \
                and _checkpointing(self.backbone):
            raise NotImplementedError("routing='segment' does not support gradient checkpointing")

    def _routing_stats(self, router_logits, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux loss, expert load) over the valid tokens; (0, empty) for a dense backbone."""
        if not self.is_moe:
            return torch.zeros((), device=self.device), torch.zeros(0, device=self.device)
        layers = list(router_logits)
        aux = load_balancing_loss(layers, self.top_k, self.experts, mask=attention_mask)
        load = expert_load_from_router_logits(layers, attention_mask, self.top_k, self.experts)
        return aux, load

    def forward(self, batch: dict[str, torch.Tensor], segment_ids: torch.Tensor | None = None) -> DiscOutput:
        """Score a padded batch (``collate`` output; either padding side).

        ``segment_ids`` (B, L), optional: 0 prompt / free, 1 caption, 2 reasoning; used only
        with ``routing="segment"``. The aux loss is the backbone's load-balancing loss
        ``E * sum_e f_e P_e`` over valid tokens of all layers, *not* multiplied by ``aux_coef``.
        """
        self._check_inputs(batch, segment_ids)
        inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
        mask = batch["attention_mask"]
        extra = {"output_router_logits": True} if self.is_moe else {}
        pinned = self.routing == "segment" and segment_ids is not None
        self._segments.segments = segment_ids.reshape(-1) if pinned else None
        try:
            with autocast_for(mask.device):   # bf16 compute on GPU; fp32 weights stay the master copy
                out = self.backbone.model(**inputs, use_cache=False, **extra)
        finally:
            self._segments.segments = None
        hidden = out.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_last = hidden[rows, last_valid_index(mask).to(hidden.device)]
        values = self.value_head(self.dropout(h_last.to(self.value_head.weight.dtype))).squeeze(-1)
        scores = values.clamp(self.clip[0], self.clip[1])
        aux, load = self._routing_stats(getattr(out, "router_logits", None), mask)
        return DiscOutput(scores=scores, aux_loss=aux, expert_load=load, tokens=int(mask.sum()))

    # ---- persistence

    def save(self, out_dir: str | Path, processor=None, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Backbone via ``save_pretrained`` (a normal HF folder) + value head + config json.
        ``state``: the discriminator's full state dict to write instead of the module's own
        tensors (under FSDP2 the weights gathered from the shards)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            self.backbone.save_pretrained(out)
            head = self.value_head.weight
        else:
            self.backbone.save_pretrained(out, state_dict={k.removeprefix("backbone."): v for k, v in state.items()
                                                           if k.startswith("backbone.")})
            head = state["value_head.weight"]
        save_file({"weight": head.detach().cpu().contiguous()}, str(out / VALUE_HEAD_NAME))
        (out / DISC_CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        if processor is not None:
            processor.save_pretrained(out)
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None,
             dtype: torch.dtype | str = "auto", gradient_checkpointing: bool = False) -> Discriminator:
        """Load a folder written by :meth:`save`; returned in eval mode (call ``.train()``).
        ``gradient_checkpointing`` recomputes the backbone's activations in the backward pass."""
        path = Path(path)
        cfg_file = path / DISC_CONFIG_NAME
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path} is not a discriminator folder (no {DISC_CONFIG_NAME})")
        cfg = json.loads(cfg_file.read_text())
        backbone = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        install_batched_rope_index(backbone)
        if gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if device is not None:
            backbone = backbone.to(device)
        if cfg["variant"] != ("moe" if is_moe(backbone) else "dense"):
            raise ValueError(f"{path}: config says variant {cfg['variant']!r}, backbone disagrees")
        disc = cls(backbone, text_only=cfg["text_only"], clip=(cfg["clip_min"], cfg["clip_max"]),
                   routing=cfg["routing"], dropout=cfg.get("dropout", 0.1))
        head = load_file(str(path / VALUE_HEAD_NAME))
        with torch.no_grad():
            disc.value_head.weight.copy_(head["weight"])
        return disc.eval()


def init_discriminator(from_dir: str | Path, out_dir: str | Path, *, experts: int = 4, top_k: int = 2,
                       dense: bool = False, text_only: bool = False, noise_std: float = 0.01,
                       routing: str = "learned", seed: int = 0, router_std: float = 0.02,
                       aux_coef: float = 0.01, clip: tuple[float, float] = (-10.0, 10.0)) -> Path:
    """Build a discriminator from a policy checkpoint and save it (``prism disc init``).

    ``dense``: the backbone is the dense model itself (ablation); otherwise the dense model is
    upcycled (an already-MoE checkpoint is used as it is). The processor is copied along.
    """
    model = AutoModelForImageTextToText.from_pretrained(from_dir, dtype="auto")
    if not dense and not is_moe(model):
        model = upcycle_model(model, experts=experts, top_k=top_k, noise_std=noise_std,
                              router_std=router_std, aux_coef=aux_coef, seed=seed)
    elif dense and is_moe(model):
        raise ValueError(f"--dense asks for a dense backbone but {from_dir} is an MoE checkpoint")
    disc = Discriminator(model, text_only=text_only, clip=clip, routing=routing, seed=seed)
    return disc.save(out_dir, processor=AutoProcessor.from_pretrained(from_dir))


# --------------------------------------------------------------------------- segment scoring


@dataclass
class SegmentScores:
    """Per-response caption and reasoning scores (B,), validity, and routing statistics.

    ``aux_loss`` is the mean over the scoring forward passes (unscaled); ``expert_load`` the
    token-weighted fraction of routed slots per expert over all passes (empty for dense);
    ``tokens`` the tokens those passes scored (the weight of ``expert_load`` when loads of
    several calls are pooled); ``forwards`` how many forward passes the call ran;
    ``idle_forwards`` how many idle passes a distributed caller added (0 here).
    """

    cap: torch.Tensor
    reason: torch.Tensor
    valid: torch.Tensor
    expert_load: torch.Tensor
    aux_loss: torch.Tensor
    tokens: int = 0
    forwards: int = 0
    idle_forwards: int = 0


def strip_images(prompt: Encoded, vision_ids: Sequence[int]) -> Encoded:
    """The prompt without its image: vision tokens removed, no pixel tensors (text-only variant).

    The chat template renders an image as ``<|vision_start|><|image_pad|>...<|vision_end|>``;
    dropping those tokens leaves the prompt text with its placeholders stripped.
    """
    ids = prompt.input_ids[:prompt.prompt_len]
    keep = ~torch.isin(ids, torch.tensor(list(vision_ids), dtype=ids.dtype))
    ids = ids[keep]
    return Encoded(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), prompt_len=int(ids.numel()),
                   record=prompt.record)


def _with_segment(prompt: Encoded, seg_ids: torch.Tensor, segment: int) -> tuple[Encoded, torch.Tensor]:
    """prompt + segment tokens as one example, and its per-token segment ids."""
    p_ids = prompt.input_ids[:prompt.prompt_len]
    p_mm = prompt.mm_token_type_ids[:prompt.prompt_len]
    enc = Encoded(input_ids=torch.cat([p_ids, seg_ids]),
                  mm_token_type_ids=torch.cat([p_mm, torch.zeros_like(seg_ids).to(p_mm.dtype)]),
                  prompt_len=prompt.prompt_len, pixel_values=prompt.pixel_values,
                  image_grid_thw=prompt.image_grid_thw)
    seg = torch.cat([torch.full((int(p_ids.numel()),), SEGMENT_FREE, dtype=torch.long),
                     torch.full((int(seg_ids.numel()),), segment, dtype=torch.long)])
    return enc, seg


def segment_examples(prompts: Sequence[Encoded], segments: Sequence[Segments]) -> list[tuple[Encoded, torch.Tensor]]:
    """The 2B sequences a scoring call feeds: B ``prompt + caption segment`` ones, then B
    ``prompt + reasoning segment`` ones (see :mod:`prism_rl.models.segments`)."""
    caps = [_with_segment(p, s.caption, SEGMENT_CAPTION) for p, s in zip(prompts, segments)]
    reasons = [_with_segment(p, s.reasoning, SEGMENT_REASONING) for p, s in zip(prompts, segments)]
    return caps + reasons


def run_examples(disc: Discriminator, examples: list[tuple[Encoded, torch.Tensor]], pad_id: int, *,
                 batch_size: int = 16, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score (example, segment ids) pairs in length-sorted, right-padded micro-batches.

    Returns (scores in input order, mean aux loss over micro-batches, token-weighted expert load).
    """
    device = torch.device(device) if device is not None else disc.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    scores, auxes, loads, weights = [], [], [], []
    for s in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[s:s + batch_size]]
        batch = {k: v.to(device) for k, v in collate([e for e, _ in chunk], pad_id, side="right").items()}
        seg = pad_sequences([g for _, g in chunk], SEGMENT_FREE, "right").to(device)
        out = disc(batch, segment_ids=seg)
        scores.append(out.scores)
        auxes.append(out.aux_loss)
        loads.append(out.expert_load)
        weights.append(out.tokens)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    merged = torch.cat(scores)[inverse.to(device)]
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    load = (torch.stack(loads) * w[:, None]).sum(0) / w.sum()
    return merged, torch.stack(auxes).mean(), load


def _prepare_prompts(disc: Discriminator, processor, prompts: Sequence[Encoded]) -> list[Encoded]:
    if not disc.text_only:
        return list(prompts)
    vision_ids = vision_token_ids(processor.tokenizer)
    return [strip_images(p, vision_ids) for p in prompts]


def score_segments(disc: Discriminator, processor, prompts: Sequence[Encoded],
                   segments: Sequence[Segments | None], *, batch_size: int = 16, device=None) -> SegmentScores:
    """Score each response's caption and reasoning segments against its prompt.

    ``cap[i] = D(prompt_i + caption_i)``, ``reason[i] = D(prompt_i + reasoning_i)``. A
    ``None`` segment (a format-invalid response) gets ``cap = reason = 0`` and
    ``valid = False`` (the advantage rule replaces them). Differentiable unless the caller
    disables grad.
    """
    if len(prompts) != len(segments):
        raise ValueError(f"{len(prompts)} prompts but {len(segments)} segment pairs")
    device = torch.device(device) if device is not None else disc.device
    keep = [i for i, s in enumerate(segments) if s is not None]
    valid = torch.zeros(len(segments), dtype=torch.bool, device=device)
    valid[keep] = True
    zeros = torch.zeros(len(segments), device=device)
    if not keep:
        return SegmentScores(zeros, zeros, valid, torch.zeros(disc.experts, device=device),
                             torch.zeros((), device=device))
    examples = segment_examples(_prepare_prompts(disc, processor, [prompts[i] for i in keep]),
                                [segments[i] for i in keep])
    scores, aux, load = run_examples(disc, examples, special_ids(processor)[1], batch_size=batch_size,
                                     device=device)
    n, idx = len(keep), torch.tensor(keep, dtype=torch.long, device=device)
    zeros = zeros.to(scores.dtype)
    return SegmentScores(cap=zeros.index_copy(0, idx, scores[:n]), reason=zeros.index_copy(0, idx, scores[n:]),
                         valid=valid, expert_load=load, aux_loss=aux, tokens=sum(len(e) for e, _ in examples),
                         forwards=scoring_forwards(n, batch_size))


def scoring_forwards(responses: int, batch_size: int) -> int:
    """Forward passes :func:`score_segments` runs for ``responses`` valid responses:
    ``ceil(2 * responses / batch_size)`` (a caption and a reasoning sequence each)."""
    return -(-2 * responses // batch_size)


def idle_forward(disc: Discriminator, processor, prompt: Encoded, segments: Segments) -> torch.Tensor:
    """One forward pass of ``prompt + caption segment``, returned as ``0 * score``: a pass whose
    result counts for nothing. Under FSDP2 every forward (and its backward) is collective, so a
    rank that scored fewer sequences than another runs idle passes until the counts agree; add
    the result to the loss so the backward runs through it too (its gradient is zero)."""
    example = segment_examples(_prepare_prompts(disc, processor, [prompt]), [segments])[:1]
    scores, _, _ = run_examples(disc, example, special_ids(processor)[1], batch_size=1)
    return scores.sum() * 0.0
