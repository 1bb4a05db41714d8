"""Model shapes, workload sizes, and random-init models behind a real Qwen3-VL processor.

Random weights are honest for speed and memory, not for accuracy. The processor is the
embedded tiny one (same patch 16 / merge 2 / temporal 2 image path as Qwen3-VL, a byte-level
BPE trained on the synthetic problems' texts) with its pixel cap raised so that a 448 x 448
image keeps its size: 28 x 28 patches, 196 image tokens, as the real processor gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Qwen3-VL-2B / -4B / -8B (public config.json of the Instruct checkpoints): text decoder, then vision tower.
QWEN_TEXT = {
    "2b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
               intermediate_size=6144),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=12288),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128),
}
QWEN_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17])
# the 8B checkpoint has a larger vision tower and an untied output head
VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24])
TIED = {"2b": True, "4b": True, "8b": False, "tiny": True}
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, deepstack_visual_indexes=[0])
MROPE = {128: [24, 20, 20], 16: [2, 3, 3]}
QWEN_VOCAB = 151936


@dataclass(frozen=True)
class Workloads:
    """How big each suite's jobs are. ``real`` is the issue's list; ``tiny`` runs every code path
    on a CPU in about a minute."""

    rollout_seqs: tuple[int, ...] = (64, 512)    # sequences per generate call (prompts x rollout_n)
    rollout_n: int = 8                            # samples per prompt
    rollout_new: int = 512                        # new tokens per sequence
    train_rows: int = 16                          # packed rollouts per timed update
    train_micro: int = 8                          # sequences per forward/backward
    train_len: int = 2048                         # longest sequence (prompt + response); responses vary 1/2..1
    rl: tuple[tuple[int, int, int], ...] = ((8, 8, 256), (16, 16, 1024))   # prompts x samples x tokens
    rl_micro: int = 16
    mem: tuple[int, int, int] = (1, 16, 8192)     # the memory row: prompts x samples x response tokens
    mem_micro: int = 4
    shapes: tuple[str, ...] = ("2b", "4b")        # rollout and train run each
    rl_shape: str = "2b"
    mem_shape: str = "4b"
    matmul_n: int = 8192
    copy_bytes: int = 2 << 30
    extra: dict = field(default_factory=dict)


REAL = Workloads()
TINY = Workloads(rollout_seqs=(8, 16), rollout_n=4, rollout_new=12, train_rows=4, train_micro=2, train_len=320,
                 rl=((2, 4, 8), (2, 4, 16)), rl_micro=4, mem=(1, 4, 24), mem_micro=2, shapes=("tiny",),
                 rl_shape="tiny", mem_shape="tiny", matmul_n=384, copy_bytes=32 << 20)


def tokenizer_corpus(k: int = 48) -> list[str]:
    """System prompt, questions and teacher answers of ``k`` synthetic problems per family."""
    from prism_rl.data.synth import FAMILIES, make_problem, teacher_response
    from prism_rl.format import SYSTEM_PROMPT
    texts = []
    for fam in FAMILIES:
        for i in range(k):
            p, _ = make_problem(i, 0, fam, image_size=48)
            texts.append(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{p.query.question}"
                         f"<|im_end|>\n<|im_start|>assistant\n{teacher_response(p)}<|im_end|>\n")
    return texts


def build_processor(image_size: int = 448):
    """A real ``Qwen3VLProcessor`` (tiny BPE) whose pixel cap keeps ``image_size``^2 images whole."""
    from prism_rl.models.loading import set_pixel_limits
    from prism_rl.models.tiny import TinySpec, train_tokenizer
    from prism_rl.models.tiny import build_processor as tiny_processor
    tok = train_tokenizer(tokenizer_corpus(), 2048)
    proc = tiny_processor(tok, TinySpec())
    set_pixel_limits(proc, max_pixels=image_size * image_size, min_pixels=None)
    return proc


def model_config(shape: str, processor):
    """``Qwen3VLConfig`` of ``shape`` ("2b", "4b", "8b", "tiny") with the processor's token ids."""
    from transformers import Qwen3VLConfig
    if shape not in QWEN_TEXT:
        raise ValueError(f"unknown model shape {shape!r}; choose from {sorted(QWEN_TEXT)}")
    ids = processor.tokenizer.convert_tokens_to_ids
    t = QWEN_TEXT[shape]
    vocab = len(processor.tokenizer) if shape == "tiny" else QWEN_VOCAB
    vision = {"tiny": TINY_VISION, "8b": VISION_8B}.get(shape, QWEN_VISION)
    text = dict(t, vocab_size=vocab, max_position_embeddings=32768, pad_token_id=ids("<|endoftext|>"),
                tie_word_embeddings=TIED[shape],
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": MROPE[t["head_dim"]],
                                 "mrope_interleaved": True})
    vis = dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=t["hidden_size"],
               num_position_embeddings=2304)
    return Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=ids("<|image_pad|>"),
                         video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                         vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=TIED[shape])


def build_model(shape: str, processor, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-init ``Qwen3VLForConditionalGeneration`` of ``shape`` on ``device`` (same weights per seed),
    EOS / pad ids set as ``load_policy`` sets them. transformers' own code: no prism patch installed."""
    from transformers import Qwen3VLForConditionalGeneration

    from prism_rl.models.loading import special_ids
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(model_config(shape, processor))
    model.to(dtype)
    eos, pad = special_ids(processor)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    return model
