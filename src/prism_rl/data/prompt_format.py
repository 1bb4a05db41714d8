"""Which response format a prompt asks for, the check that it is the one the reward scores,
and the rewrite of a prompt to ask for the PRISM format.

Public RL data carries its own format instruction: verl's and EasyR1's geo3k and math
examples end the question with "... The reasoning process MUST BE enclosed within <think>
</think> tags. The final answer MUST BE put in \\boxed{}." A policy that follows it earns
nothing from the PRISM reward, which scores ``<caption>/<think>/<answer>``: RL on that file
optimises a reward its prompts never ask for. :func:`check_prompts` stops such a run before it
starts, naming the file, the record and both formats; :func:`to_prism_format` rewrites a
prompt to carry the PRISM system prompt instead (``prism data convert --prism-format``).

A prompt's format instruction is read from its text (system and user turns) by markers:

=============  ==========================================  ==========================
convention     what the prompt mentions                    scored by
=============  ==========================================  ==========================
``prism``      ``<caption>``                               the PRISM reward
``boxed``      ``\\boxed``                                  ``reward.function=boxed``
``answer``     ``<answer>`` but no ``<caption>`` (R1 style)  a plug-in reward
``think``      only ``<think>``                            a plug-in reward
=============  ==========================================  ==========================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from prism_rl.data.layouts import read_records, write_records
from prism_rl.data.records import IMAGE_PLACEHOLDER, BadField, DataError, Record
from prism_rl.format import SYSTEM_PROMPT

__all__ = ["CONVENTIONS", "PromptFormatError", "asked_conventions", "check_prompts", "convert_file",
           "to_prism_format"]

# convention -> how a message names what it asks for
CONVENTIONS = {
    "prism": "<caption>/<think>/<answer> responses",
    "boxed": "\\boxed{} answers",
    "answer": "<think>/<answer> responses without <caption>",
    "think": "<think> reasoning without <caption> or <answer>",
}
# Text that belongs to a format instruction: a sentence holding one of these is one.
_MARKERS = ("<caption>", "<think>", "</think>", "<answer>", "</answer>", "\\boxed")
# The instruction sentences of public templates (verl and EasyR1 geo3k/math, R1-V, the Qwen
# math prompt), removed wherever they are, whatever precedes them.
_KNOWN_SENTENCES = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\s*you first think about the reasoning process as an internal monologue and then provide the final answer\.?",
    r"\s*the reasoning process must be enclosed within <think>\s*</think> tags\.?",
    r"\s*the final answer must be put in \\boxed\{\}\.?",
    r"\s*output the thinking process in <think>\s*</think> and (the )?final answer( \(\w+\))? in "
    r"<answer>\s*</answer> tags\.?",
    r"\s*please reason step by step, and put your final answer within \\boxed\{\}\.?",
))
_SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")

log = logging.getLogger(__name__)


class PromptFormatError(DataError):
    """The prompts ask for a response format the reward does not score."""


def asked_conventions(messages: Sequence[dict[str, str]]) -> tuple[str, ...]:
    """The conventions (keys of :data:`CONVENTIONS`) the prompt's system and user turns ask for.

    Rules: ``<caption>`` -> prism; ``\\boxed`` -> boxed; ``<answer>`` without ``<caption>`` ->
    answer; ``<think>`` and nothing else -> think. A prompt without markers asks for nothing.
    """
    text = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    asked = []
    if "<caption>" in text:
        asked.append("prism")
    if "\\boxed" in text:
        asked.append("boxed")
    if "<answer>" in text and "prism" not in asked:
        asked.append("answer")
    if "<think>" in text and not asked:
        asked.append("think")
    return tuple(asked)


def check_prompts(records: Sequence[Record], convention: str, reward: str, fixes: Sequence[str]) -> int:
    """Stop when a prompt asks for another format than ``convention``, the one the reward scores.

    Raises :class:`PromptFormatError` naming the first such record's file and index, what it
    asks for, what ``reward`` (its name, for the message) scores, how many prompts conflict
    and the ``fixes`` (settings or commands, in the caller's words). Returns the number of
    prompts that ask for no format at all (the caller warns: the policy must know it already).
    """
    conflicts, silent = [], 0
    for rec in records:
        asked = asked_conventions(rec.messages)
        if not asked:
            silent += 1
        elif any(c != convention for c in asked):
            conflicts.append((rec, asked))
    if not conflicts:
        if silent:
            log.warning("%d of %d prompts (%s, ...) ask for no response format; the reward (%s) scores %s, "
                        "which the policy has to produce unprompted", silent, len(records),
                        records[0].source, reward, CONVENTIONS[convention])
        return silent
    rec, asked = conflicts[0]
    wants = " and ".join(CONVENTIONS[c] for c in asked)
    raise PromptFormatError(
        f"{rec.where('prompt')}: the prompt asks for {wants}, but the reward ({reward}) scores "
        f"{CONVENTIONS[convention]}, so a response that follows the prompt earns no reward "
        f"({len(conflicts)} of {len(records)} prompts ask for another format). "
        f"Fix: {'; or '.join(fixes)}")


def _strip_instruction(text: str) -> str:
    """``text`` without its format instruction: the sentences of known templates wherever they
    are, then every later sentence (after a ``.``, ``!`` or ``?``) that names a marker. The
    first sentence is never dropped: an instruction appended to a question that does not end
    in a full stop would take the question with it, so a marker left there stays (and
    :func:`to_prism_format` refuses the prompt)."""
    for pattern in _KNOWN_SENTENCES:
        text = pattern.sub("", text)
    parts = _SENTENCE_END.split(text)
    kept = parts[:2]
    for k in range(2, len(parts), 2):
        sentence, sep = parts[k], parts[k + 1] if k + 1 < len(parts) else ""
        if not any(m in sentence for m in _MARKERS):
            kept.append(sentence + sep)
    return "".join(kept).strip()


def to_prism_format(rec: Record) -> Record:
    """The record with the PRISM system prompt as its only system turn and the format
    instruction removed from its user turns (see :func:`_strip_instruction`).

    Raises :class:`BadField` (field ``prompt``) when a marker is left (it sits inside a
    sentence that also holds the question) or an ``<image>`` placeholder would be lost: such
    a prompt needs editing by hand.
    """
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for k, m in enumerate(rec.messages):
        if m["role"] == "system":
            continue
        if m["role"] != "user":  # an earlier assistant turn is an answer, not an instruction
            messages.append(dict(m))
            continue
        text = _strip_instruction(m["content"])
        left = [mk for mk in _MARKERS if mk in text]
        if left:
            raise BadField("prompt", f"message {k}: cannot remove the format instruction ({left[0]!r} is "
                                     f"inside a sentence that stays): edit it by hand")
        if text.count(IMAGE_PLACEHOLDER) != m["content"].count(IMAGE_PLACEHOLDER):
            raise BadField("prompt", f"message {k}: an '{IMAGE_PLACEHOLDER}' placeholder is inside the "
                                     "format instruction: edit it by hand")
        messages.append({"role": m["role"], "content": text})
    return replace(rec, messages=messages)


def convert_file(src: str | Path, out: str | Path, *, prism_format: bool = False) -> dict[str, int]:
    """Read ``src`` (any layout :func:`read_records` reads) and write it to ``out`` in the
    layout of ``out``'s suffix; with ``prism_format``, every prompt rewritten by
    :func:`to_prism_format`. A prompt that cannot be rewritten raises :class:`DataError`
    naming the file, record and field, before anything is written. Returns counts."""
    records = read_records(src)
    if prism_format:
        converted = []
        for rec in records:
            try:
                converted.append(to_prism_format(rec))
            except BadField as e:
                raise DataError(f"{rec.where(e.field)}: {e.why}") from None
        changed = sum(a.messages != b.messages for a, b in zip(records, converted))
        records = converted
    write_records(records, out)
    stats = {"records": len(records)}
    if prism_format:
        stats["prompts_rewritten"] = changed
    return stats
