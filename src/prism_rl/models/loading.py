"""Load a policy model and its processor from a local Hugging Face folder.

One code path for the embedded tiny model and a real Qwen3-VL-4B/8B checkpoint: only the
folder changes. Fixes what a fresh or foreign checkpoint may lack (EOS and pad ids in the
generation config) and applies the training-time switches (frozen vision tower, gradient
checkpointing).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..config import ModelConfig
from .mrope import install_batched_rope_index


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """Weight dtype. ``auto``: float32 on CPU (CPU bf16 matmuls are slow and lossy); on GPU,
    bfloat16 for inference and float32 for training (the trainers then run the forward under
    bf16 autocast, keeping fp32 master weights and optimizer states)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and not training else torch.float32
    return getattr(torch, name)


def load_processor(path: str | Path, max_pixels: int | None = None, min_pixels: int | None = None):
    """The checkpoint's processor, with left padding for generation and optional pixel limits."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path '{path}' is not a folder (a local Hugging Face checkpoint)")
    processor = AutoProcessor.from_pretrained(path)
    set_pixel_limits(processor, max_pixels, min_pixels)
    return processor


def set_pixel_limits(processor, max_pixels: int | None, min_pixels: int | None) -> None:
    """Resize images to at most ``max_pixels`` / at least ``min_pixels`` (``None`` keeps)."""
    size = dict(processor.image_processor.size)
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    processor.image_processor.size = size


def special_ids(processor) -> tuple[int, int]:
    """(eos id, pad id): ``<|im_end|>`` ends an assistant turn in Qwen's chat format."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tok.unk_token_id:
        eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return eos, pad


VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision placeholder tokens the tokenizer knows. A response must never contain
    one: a sampled ``<|image_pad|>`` would make the teacher-forced forward count more image
    tokens than the image has features (transformers raises), so generation suppresses them;
    the text-only discriminator removes them from its prompts."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in VISION_TOKENS if t in vocab]


def load_policy(cfg: ModelConfig, device: torch.device | None = None, trainable: bool = True):
    """Load ``(model, processor)`` as ``cfg`` says, on ``device``."""
    device = device or pick_device()
    processor = load_processor(cfg.path)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.path, dtype=resolve_dtype(cfg.dtype, device, training=trainable), attn_implementation=cfg.attn_implementation,
    ).to(device)
    install_batched_rope_index(model)  # M-RoPE ids batched, not row by row (models/mrope.py)
    eos, pad = special_ids(processor)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    if cfg.freeze_vision:
        for p in vision_parameters(model):
            p.requires_grad_(False)
    if trainable and cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.config.use_cache = False
    model.train(trainable)
    return model, processor


def enabled_sdpa_backends() -> list[SDPBackend]:
    """The SDPA kernels scaled_dot_product_attention may pick from right now (global flags that
    ``sdpa_kernel`` contexts set; they steer the CPU kernels too)."""
    flags = ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
             (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
             (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
             (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled()))
    return [backend for backend, on in flags if on]


def same_sdpa_in_recompute():
    """``context_fn`` of ``torch.utils.checkpoint``: (forward context, recompute context).

    The forward context records which SDPA kernels were enabled; the recompute context, which
    runs inside the backward pass, enables exactly those again. Without it a kernel choice made
    by a context around the forward only (``logprobs.TRAIN_SDPA_BACKENDS``) is gone by the time
    the backward recomputes the layer: on an H200 the forward ran the memory-efficient kernel
    and the recompute cuDNN's, which save tensors of other shapes (the mask expanded to
    [B, heads, L, L] vs [B, 1, L, L], a CPU vs GPU seed), and checkpoint raised CheckpointError.
    """
    chosen: list[SDPBackend] = []

    @contextmanager
    def record():
        chosen[:] = enabled_sdpa_backends()
        yield

    @contextmanager
    def replay():
        with sdpa_kernel(list(chosen)) if chosen else nullcontext():
            yield

    return record(), replay()


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint every layer of ``model`` (non-reentrant): its activations are recomputed in the
    backward pass, with the same SDPA kernels as its forward (:func:`same_sdpa_in_recompute`)."""
    kwargs = {"use_reentrant": False, "context_fn": same_sdpa_in_recompute}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def vision_parameters(model: torch.nn.Module):
    """Parameters of the vision tower (encoder and merger) of a Qwen-VL style model."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None:
        raise ValueError("model has no vision tower at model.visual; cannot freeze it")
    return list(visual.parameters())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def autocast_for(device: torch.device):
    """bf16 autocast on GPU (weights and optimizer states stay fp32); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
