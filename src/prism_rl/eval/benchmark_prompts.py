"""The user turn each benchmark's own evaluation sends the model (docs/BENCHMARKS.md).

One function per benchmark builds the text that follows the image placeholder(s), in the
benchmark's own words; the loaders (``prism_rl.eval.loaders``) call them. The system prompt is
PRISM's (the ``<caption>/<think>/<answer>`` format, ``prism_rl.format``): that is the one
change prism-rl makes to every benchmark. A benchmark sentence that prescribes the *layout* of
the whole response (WeMath's ``<Thought process>: ... <Answer>: ...`` template, MMMU-Pro's
"the last line of your response should be 'Answer: $LETTER'") cannot be followed together with
that format, so it is left out (:data:`LEFT_OUT` lists each); everything else is kept word for
word, including MathVision's ``\\boxed{}`` (a boxed answer inside ``<answer>`` is read by the
rules). Sources:

=================  ==========================================================================
MathVista          the release's ``query`` (``evaluation/build_query.py``, zero-shot)
MathVerse          the release's ``query_wo`` (what the MathVerse README asks for the "w/o"
                   leaderboard score and what lmms-eval's ``mathverse_testmini`` sends)
MathVision         ``models/*.py`` of the MATH-V repository (the step-by-step variant)
WeMath             the We-Math repository's inference prompt
MMMU               ``eval/`` of the MMMU repository (``multi_choice_example_format``,
                   ``short_ans_example_format``)
MMMU-Pro           ``mmmu-pro/prompts.yaml`` of the MMMU repository, chain-of-thought prompts
HallusionBench     the question alone (the HallusionBench repository and lmms-eval's
                   ``hallusion_bench_image`` add nothing)
=================  ==========================================================================
"""

from __future__ import annotations

__all__ = [
    "LEFT_OUT", "LETTERS", "MATHVERSE_HINTS", "MATHVISION_INSTRUCTION", "MMMU_MC_INSTRUCTION",
    "MMMU_OPEN_INSTRUCTION", "MMMU_PRO_STANDARD", "MMMU_PRO_VISION", "WEMATH_INSTRUCTION",
    "hallusion_prompt", "join_lines", "mathverse_query", "mathvision_prompt", "mathvista_hint",
    "mathvista_query", "mmmu_prompt", "mmmu_pro_standard_prompt", "parenthesised_options",
    "wemath_prompt",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def join_lines(*parts: str) -> str:
    """The non-empty parts, one per line."""
    return "\n".join(p for p in parts if p)


def parenthesised_options(options: list[str]) -> str:
    """``(A) first`` lines (MathVista, MathVision and MMMU write options this way)."""
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _dotted_options(options: list[str]) -> str:
    """``A. first`` lines (MMMU-Pro's ``parse_options``)."""
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


# --------------------------------------------------------------------------- MathVista

MATHVISTA_HINT_MC = ("Hint: Please answer the question and provide the correct option letter, "
                     "e.g., A, B, C, D, at the end.")
MATHVISTA_HINTS = {
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and "
              "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places and "
              "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
            "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def mathvista_hint(answer_type: str, precision, multi_choice: bool) -> str:
    """The answer-type hint of MathVista's query (precision 1 or 2 as the release words it;
    any other precision in the same words)."""
    if multi_choice:
        return MATHVISTA_HINT_MC
    kind = answer_type.lower()
    if kind != "float":
        return MATHVISTA_HINTS.get(kind, "")
    if isinstance(precision, (int, float)) and precision == precision and precision >= 0:
        p = int(precision)
        if f"float{p}" in MATHVISTA_HINTS:
            return MATHVISTA_HINTS[f"float{p}"]
        return (f"Hint: Please answer the question requiring a floating-point number with {p} decimal "
                f"places and provide the final value at the end.")
    return "Hint: Please answer the question requiring a floating-point number and provide the final value at the end."


def mathvista_query(query: str, question: str, unit: str, answer_type: str, precision,
                    choices: list[str]) -> str:
    """MathVista's query: the release's ``query`` when given, else the same text built as its
    ``build_query.py`` does: ``hint \\n Question: q (Unit: u) \\n Choices: \\n (A) ...``."""
    if query:
        return query
    text = f"Question: {question}" + (f" (Unit: {unit})" if unit else "")
    block = join_lines("Choices:", parenthesised_options(choices)) if choices else ""
    return join_lines(mathvista_hint(answer_type, precision, bool(choices)), text, block)


# --------------------------------------------------------------------------- MathVerse

# query_wo's first sentence, by question type ("w/o" = without chain-of-thought scoring)
MATHVERSE_HINTS = {
    "multi-choice": "Please directly answer the question and provide the correct option letter, e.g., A, B, C, D.",
    "free-form": "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.",
}
MATHVERSE_VISION_ONLY = "According to the question shown in the image,"


def mathverse_query(query_wo: str, question: str, question_type: str, vision_only: bool) -> str:
    """MathVerse's ``query_wo`` when the release gives it, else rebuilt in its words:
    ``hint \\n Question: q``; a Vision Only row (question in the diagram) is one sentence,
    ``According to the question shown in the image, please directly answer ...``."""
    if query_wo:
        return query_wo
    hint = MATHVERSE_HINTS["multi-choice" if question_type == "multi-choice" else "free-form"]
    if vision_only:
        return f"{MATHVERSE_VISION_ONLY} {hint[0].lower()}{hint[1:]}"
    return join_lines(hint, f"Question: {question}")


# --------------------------------------------------------------------------- MathVision

MATHVISION_INSTRUCTION = ('Please solve the problem step by step and put your answer in one "\\boxed{}". '
                          'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".')


def mathvision_options(options: list[str]) -> str:
    """The ``(A) ...`` block, empty when the options are only their own letters (the choices
    are drawn in the image; MATH-V then sends no block)."""
    if all(o.strip() == LETTERS[i] for i, o in enumerate(options)):
        return ""
    return parenthesised_options(options)


def mathvision_prompt(question: str, options: list[str]) -> str:
    """MATH-V's prompt: ``instruction \\n question \\n (A) ... (E) ...`` (free-form rows get the
    same instruction, which asks for the boxed value)."""
    return join_lines(MATHVISION_INSTRUCTION, question, mathvision_options(options))


# --------------------------------------------------------------------------- WeMath

WEMATH_INSTRUCTION = ("Now, we require you to solve a multiple-choice math question. Please briefly describe "
                      "your thought process and provide the final answer(option).")


def wemath_prompt(question: str, option: str) -> str:
    """We-Math's prompt: ``instruction \\n Question: q \\n Option: o`` (``option`` as released,
    ``"A. ...;B. ..."``)."""
    return join_lines(WEMATH_INSTRUCTION, f"Question: {question}", f"Option: {option}")


# --------------------------------------------------------------------------- MMMU / MMMU-Pro

MMMU_MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MMMU_OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
MMMU_PRO_STANDARD = "Answer the preceding multiple choice question. Think step by step before answering."
MMMU_PRO_VISION = "Write out the multiple-choice question in the image and then solve it. Think step by step before answering."


def mmmu_prompt(question: str, options: list[str]) -> str:
    """MMMU's prompt: ``q \\n (A) ... \\n\\n instruction`` for multiple choice (its format
    ``"{}\\n{}\\nAnswer ..."`` with an options block ending in a newline), ``q \\n instruction``
    for an open question."""
    if options:
        return f"{question}\n{parenthesised_options(options)}\n\n{MMMU_MC_INSTRUCTION}"
    return f"{question}\n{MMMU_OPEN_INSTRUCTION}"


def mmmu_pro_standard_prompt(question: str, options: list[str]) -> str:
    """MMMU-Pro's standard setting: ``q \\n A. ... \\n instruction`` (``infer/*.py``)."""
    return f"{question}\n{_dotted_options(options)}\n{MMMU_PRO_STANDARD}"


# --------------------------------------------------------------------------- HallusionBench


def hallusion_prompt(question: str) -> str:
    """HallusionBench asks its yes/no question as it is."""
    return question


# sentences of the benchmarks' prompts that prescribe the response layout, left out because the
# PRISM system prompt prescribes it (docs/BENCHMARKS.md)
LEFT_OUT = {
    "wemath": ("Regarding the format, please answer following the template below, and be sure to include "
               "two <> symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your option>>"),
    "mmmu_pro": ("The last line of your response should be of the following format: 'Answer: $LETTER' "
                 "(without quotes) where LETTER is one of options."),
}
