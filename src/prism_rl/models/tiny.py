"""The embedded default model: a tiny, randomly initialised Qwen3-VL.

``build_tiny(out_dir, corpus)`` trains a byte-level BPE tokenizer on the given texts, adds
Qwen's special tokens and a Qwen-style chat template, builds transformers'
``Qwen3VLForConditionalGeneration`` at a size that learns the synthetic tasks on a 2-core CPU,
wires a real ``Qwen3VLProcessor`` (image + video processors), and saves everything with
``save_pretrained`` so that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

# Qwen2.5/3 special tokens, in Qwen's order, so the ids of the vision tokens follow the same
# pattern as in real checkpoints (only the absolute offsets differ).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The response-format tags get one token each: shorter sequences, and the caption/reasoning
# boundary falls on a token boundary. They are ordinary (non-special) tokens, so decoding with
# skip_special_tokens keeps them.
FORMAT_TOKENS = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]

# A Qwen-style ChatML template. Message content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} items, as in Qwen's own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class TinySpec:
    """Size of the embedded model. Defaults chosen for a 2-core CPU (see docs/PERFORMANCE.md)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 192
    vision_depth: int = 1
    vision_heads: int = 2
    patch_size: int = 16
    merge_size: int = 2
    image_size: int = 96
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it with Qwen's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(FORMAT_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _model_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    if sum(spec.mrope_section) * 2 != spec.head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {spec.head_dim // 2}")
    ids = tokenizer.convert_tokens_to_ids
    grid = spec.image_size // spec.patch_size
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": list(spec.mrope_section), "mrope_interleaved": True},
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size,
        temporal_patch_size=2,
        out_hidden_size=spec.hidden_size,
        # learned position table of side sqrt(n); interpolated for other image sizes
        num_position_embeddings=max(grid, 4) ** 2,
        deepstack_visual_indexes=[],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: TinySpec) -> Qwen3VLProcessor:
    """A real Qwen3-VL processor around ``tokenizer`` with the spec's patch/merge sizes."""
    factor = spec.patch_size * spec.merge_size
    pixels = dict(min_pixels=factor * factor, max_pixels=max(spec.image_size, factor) ** 2 * 4)
    image_processor = Qwen2VLImageProcessor(
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **pixels,
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=2,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=video_processor, chat_template=CHAT_TEMPLATE,
    )


def build_tiny(out_dir: str | Path, corpus: Iterable[str], spec: TinySpec | None = None) -> Path:
    """Build and save the tiny model + processor to ``out_dir``; returns the folder."""
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(_model_config(spec, tokenizer))
    gen = model.generation_config
    gen.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "prism_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def corpus_from_data(path: str | Path | None) -> list[str]:
    """Texts to train the tokenizer on: ChatML-rendered training records from ``path``.

    ``path`` is a data folder (its ``sft.json`` and ``align.parquet`` are used; held-out files
    are not) or one data file. With no path, a small built-in corpus (the system prompt and
    the format tags) is used, which gives a working but poorly compressing tokenizer.
    """
    from ..data.layouts import read_records  # local import: keeps model building light
    from ..format import SYSTEM_PROMPT

    if not path:
        return [SYSTEM_PROMPT, *FORMAT_TOKENS] * 8
    p = Path(path)
    files = [p / "sft.json", p / "align.parquet"] if p.is_dir() else [p]
    texts = []
    for f in files:
        if not f.exists():
            continue
        for rec in read_records(f):
            chat = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in rec.messages)
            for resp in (rec.response, rec.extra.get("teacher_response")):
                if resp:
                    chat += f"<|im_start|>assistant\n{resp}<|im_end|>\n"
            texts.append(chat)
    if not texts:
        raise FileNotFoundError(f"no training records found under {path} to train the tokenizer on")
    return texts
