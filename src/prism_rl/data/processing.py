"""Records -> token ids and pixel tensors -> padded model batches.

``encode_prompt`` renders a record's messages with the model's own chat template and runs
the real processor (which expands each image placeholder into its visual tokens).
``encode_sft`` appends the assistant response and builds labels that are ``-100`` everywhere
except the response tokens and the closing ``<|im_end|>`` (loss on assistant tokens only); an
example over the length limit is truncated (response only), or raises ``OverlongError``.
``collate`` pads a list of encoded examples on either side; ``mm_token_type_ids`` are padded
with zeros (Qwen3-VL's M-RoPE code needs them beside ``image_grid_thw``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layouts import read_records
from .records import IMAGE_PLACEHOLDER, BadRecords, DataError, Record

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenised example. ``labels`` is ``None`` for prompt-only examples."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    prompt_len: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    record: Record | None = field(default=None, repr=False)
    truncated: int = 0   # response tokens cut off to fit the length limit (encode_sft, overlong="truncate")

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def chat_messages(record: Record) -> list[dict]:
    """Messages in the chat-template item form; ``<image>`` placeholders become image items.

    If no message has a placeholder but the record has images, they go before the first user
    message's text (LLaMA-Factory's convention).
    """
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in record.messages)
    if n_placeholders not in (0, len(record.images)):
        raise DataError(f"{record.where('images')}: {n_placeholders} <image> placeholders "
                        f"but {len(record.images)} images")
    out, prepend = [], n_placeholders == 0 and bool(record.images)
    for m in record.messages:
        items: list[dict] = []
        if prepend and m["role"] == "user":
            items += [{"type": "image"} for _ in record.images]
            prepend = False
        for k, chunk in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if k > 0:
                items.append({"type": "image"})
            if chunk:
                items.append({"type": "text", "text": chunk})
        out.append({"role": m["role"], "content": items})
    return out


def _run_processor(processor, text: str, images: list) -> dict:
    kwargs = {"images": images} if images else {}
    return processor(text=[text], return_tensors="pt", **kwargs)


def encode_prompt(processor, record: Record) -> Encoded:
    """Prompt ids (ending with the assistant header) and pixel tensors for ``record``."""
    text = processor.apply_chat_template(chat_messages(record), add_generation_prompt=True, tokenize=False)
    images = record.load_images()
    try:
        out = _run_processor(processor, text, images)
    except ValueError as e:  # e.g. Qwen's "absolute aspect ratio must be smaller than 200"
        if not images:
            raise
        raise DataError(f"{record.where('images')}: the processor refused the images: {e}") from e
    ids = out["input_ids"][0]
    mm = out.get("mm_token_type_ids")
    return Encoded(
        input_ids=ids,
        mm_token_type_ids=mm[0] if mm is not None else torch.zeros_like(ids),
        prompt_len=int(ids.numel()),
        pixel_values=out.get("pixel_values"),
        image_grid_thw=out.get("image_grid_thw"),
        record=record,
    )


def response_ids(processor, response: str, eos_id: int) -> torch.Tensor:
    """Token ids of an assistant response, closed by ``eos_id`` (``<|im_end|>``)."""
    ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    return torch.tensor(list(ids) + [eos_id], dtype=torch.long)


class OverlongError(DataError):
    """An SFT example over ``data.max_length`` that was not truncated (``data.overlong`` decides)."""


OVERLONG_MODES = ("truncate", "skip", "error")


def encode_sft(processor, record: Record, eos_id: int, max_length: int, overlong: str = "error") -> Encoded:
    """Prompt + response with labels on the response tokens (and the closing EOS) only.

    With ``P`` prompt and ``R`` response tokens (EOS included) and ``P + R > max_length``:
    ``overlong="truncate"`` keeps the first ``max_length - P`` response tokens (the closing EOS
    goes with the cut, so a cut-off answer does not teach stopping there; ``Encoded.truncated``
    is ``P + R - max_length``), as LLaMA-Factory cuts its targets. The prompt is never cut (it
    holds the image tokens, which must match the pixels), so ``P >= max_length`` raises
    ``OverlongError`` in every mode, as does any over-long example under "skip" and "error".
    """
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, not {overlong!r}")
    if record.response is None:
        raise DataError(f"{record.where('response')}: SFT needs an assistant response")
    enc = encode_prompt(processor, record)
    resp = response_ids(processor, record.response, eos_id)
    total = enc.prompt_len + int(resp.numel())
    if total > max_length:
        if enc.prompt_len >= max_length:
            raise OverlongError(f"{record.where()}: the prompt alone is {enc.prompt_len} tokens, at or over "
                                f"data.max_length={max_length} (only the response can be truncated)")
        if overlong != "truncate":
            raise OverlongError(f"{record.where()}: prompt+response is {total} tokens, over "
                                f"data.max_length={max_length} (data.overlong={overlong})")
        enc.truncated = total - max_length
        resp = resp[:max_length - enc.prompt_len]
    enc.input_ids = torch.cat([enc.input_ids, resp])
    enc.mm_token_type_ids = torch.cat([enc.mm_token_type_ids, torch.zeros_like(resp)])
    enc.labels = torch.cat([torch.full((enc.prompt_len,), IGNORE_INDEX, dtype=torch.long), resp])
    return enc


def encode_prompt_checked(processor, record: Record, max_length: int) -> Encoded:
    """``encode_prompt`` plus the length limit: a longer prompt raises ``DataError`` naming it."""
    enc = encode_prompt(processor, record)
    if enc.prompt_len > max_length:
        raise DataError(f"{record.where()}: prompt is {enc.prompt_len} tokens, over the limit {max_length}")
    return enc


def skip_or_raise(record: Record, err: DataError, skip_bad: bool, bad: BadRecords | None) -> None:
    """The ``data.skip_bad`` policy for one bad record: re-raise ``err``, or count it in ``bad``."""
    if not skip_bad:
        raise err
    (bad if bad is not None else BadRecords()).add(record.where(), str(err).split(": ", 2)[-1])


def encode_all(processor, records: list[Record], *, eos_id: int, max_length: int,
               with_response: bool, skip_bad: bool = False,
               bad: BadRecords | None = None) -> list[Encoded]:
    """Encode every record; a bad one raises ``DataError`` naming it, or is skipped and counted."""
    out = []
    for rec in records:
        try:
            out.append(encode_sft(processor, rec, eos_id, max_length) if with_response
                       else encode_prompt_checked(processor, rec, max_length))
        except DataError as e:
            skip_or_raise(rec, e, skip_bad, bad)
    return out


class LazyPrompts:
    """A prompt pool that encodes record ``i`` when it is indexed, and keeps nothing.

    RL draws a few hundred prompts a step from pools of up to 10^5 or more; encoding them all
    up front costs ~5 ms each on one core and holds every image's pixel tensor in memory (about
    25 MB for one 1-megapixel image in float32). Indexing returns ``encode_prompt_checked``'s
    result or raises its ``DataError``; what to do with a bad record is the caller's choice
    (see ``trainers.rl.PromptStream``). ``check_images`` opens every image's header up front
    (cheap), so a missing or unreadable file is reported before training starts.
    """

    def __init__(self, records: list[Record], processor, max_length: int):
        self.records, self.processor, self.max_length = records, processor, max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Encoded:
        return encode_prompt_checked(self.processor, self.records[i], self.max_length)

    def check_images(self, skip_bad: bool = False, bad: BadRecords | None = None) -> LazyPrompts:
        """Drop (and count) or raise on records with an image that cannot be opened."""
        keep = []
        for rec in self.records:
            try:
                rec.check_images()
                keep.append(rec)
            except DataError as e:
                skip_or_raise(rec, e, skip_bad, bad)
        self.records = keep
        return self


def read_limited(path: str, limit: int | None, skip_bad: bool = False, bad: BadRecords | None = None) -> list[Record]:
    """The first ``limit`` records of a data file (all when ``limit`` is None)."""
    records = read_records(path, skip_bad=skip_bad, bad=bad)
    return records[:limit] if limit else records


def load_prompts(path: str, processor, *, eos_id: int, max_length: int, limit: int | None = None,
                 skip_bad: bool = False, bad: BadRecords | None = None) -> list[Encoded]:
    """Read a data file and encode the first ``limit`` records as prompts (no response)."""
    return encode_all(processor, read_limited(path, limit, skip_bad, bad), eos_id=eos_id, max_length=max_length,
                      with_response=False, skip_bad=skip_bad, bad=bad)


def pad_sequences(seqs: list[torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    """Stack 1-D tensors into (B, max_len), padded with ``value`` on the ``side`` given."""
    width = max(int(s.numel()) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        n = int(s.numel())
        if side == "left":
            out[i, width - n:] = s
        else:
            out[i, :n] = s
    return out


def collate(examples: list[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into one batch (``side`` is ``"left"`` or ``"right"``)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    batch = {
        "input_ids": pad_sequences([e.input_ids for e in examples], pad_id, side),
        "attention_mask": pad_sequences([torch.ones_like(e.input_ids) for e in examples], 0, side),
        "mm_token_type_ids": pad_sequences([e.mm_token_type_ids for e in examples], 0, side),
    }
    if all(e.labels is not None for e in examples):
        batch["labels"] = pad_sequences([e.labels for e in examples], IGNORE_INDEX, side)
    pix = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.cat(pix)
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in examples if e.image_grid_thw is not None])
    return batch


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length, then shuffle the batches.

    Keeps the order random from epoch to epoch while cutting padding (batches hold
    similar lengths), as TRL's and LLaMA-Factory's ``group_by_length`` do.
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]
