"""The paper's seven evaluation benchmarks and their settings (METHOD.md sections 8-9).

``BENCHMARKS`` maps a benchmark's key to its :class:`BenchmarkSpec`: the runs-table label,
the sampling settings, the default split and the file patterns that find it in a downloaded
release. Reading the files is ``prism_rl.eval.loaders``'s job, running the evaluation
``prism_rl.eval.run_benchmark``'s; this module imports neither, so the report and the loaders
can both use the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ConfigError

__all__ = ["BENCHMARKS", "BenchmarkSpec", "get_benchmark"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: its sampling settings (METHOD.md section 8) and default split.

    ``file_globs`` find the default split's files when ``path`` is a folder (the benchmark's
    downloaded repository); ``one_folder`` says the split ships as one file (or the shards of one
    file) in one folder, so a folder holding it twice (parquet and JSON, or a copy) is read once.
    ``label`` is the column name of the runs table (METHOD.md section 9). ``headline`` names the
    number reported for the benchmark (its own published metric, docs/BENCHMARKS.md) and
    ``breakdown`` the per-record metadata keys ``summary.json`` breaks accuracy out by.
    """

    name: str
    label: str
    max_new_tokens: int
    temperature: float
    top_p: float
    split: str
    file_globs: tuple[str, ...]
    why_tokens: str = ""
    headline: str = "accuracy"
    breakdown: tuple[str, ...] = ()
    one_folder: bool = True


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s for s in (
        BenchmarkSpec("mathvista", "MVista", 16384, 1.0, 0.7, "testmini",
                      ("**/testmini-*.parquet", "**/testmini.parquet", "**/testmini.json"),
                      "short answers; 16K leaves room for long reasoning",
                      "accuracy over testmini",
                      ("question_type", "answer_type", "task", "context", "grade", "category", "source",
                       "skills", "language")),
        BenchmarkSpec("mathverse", "MVerse", 32768, 1.0, 0.7, "testmini",
                      ("**/testmini.parquet", "**/testmini-*.parquet", "**/testmini.json"),
                      "Instruct averages ~3.2K tokens (METHOD.md section 9): ~10x",
                      "accuracy over the five versions with a diagram (Text Only is reported apart)",
                      ("problem_version", "question_type", "subject", "subfield")),
        BenchmarkSpec("mathvision", "MVision", 49152, 1.0, 0.7, "testmini",
                      ("**/testmini-*.parquet", "**/testmini.parquet", "**/testmini.jsonl"),
                      "Instruct averages ~9.5K tokens (METHOD.md section 9): the maximum",
                      "accuracy over testmini", ("subject", "level")),
        BenchmarkSpec("wemath", "WeMath", 16384, 1.0, 0.7, "testmini",
                      ("**/testmini.json", "**/testmini-*.parquet", "**/testmini.parquet"),
                      "elementary multi-step problems; 16K",
                      "strict score of the four-dimensional metric", ("knowledge concept", "key")),
        BenchmarkSpec("mmmu", "MMMU", 16384, 1.0, 0.7, "validation",
                      ("**/validation-*.parquet",), "knowledge-heavy, shorter reasoning; 16K",
                      "accuracy over validation", ("domain", "subject", "question_type", "topic_difficulty"),
                      one_folder=False),
        BenchmarkSpec("mmmu_pro", "MMMU-Pro", 32768, 1.0, 0.7, "standard (10 options) + vision",
                      ("**/standard (10 options)/test-*.parquet", "**/vision/test-*.parquet"),
                      "Instruct averages ~2.8K tokens (METHOD.md section 9) with a long tail",
                      "mean of the standard (10 options) and vision accuracies", ("setting", "domain", "subject"),
                      one_folder=False),
        BenchmarkSpec("hallusionbench", "Hallu", 8192, 0.0, 1.0, "image",
                      ("**/image-*.parquet", "**/HallusionBench.json"),
                      "yes/no questions, greedy (METHOD.md section 8); 8K, the minimum",
                      "aAcc: accuracy over the image questions (qAcc and fAcc beside it)",
                      ("category", "subcategory")),
    )
}
_ALIASES = {"mathv": "mathvision", "mathvision": "mathvision", "mmmupro": "mmmu_pro",
            "hallusion": "hallusionbench", "hallusionbench": "hallusionbench"}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of ``name`` (case, ``-``, ``_`` and spaces ignored: ``MMMU-Pro`` works)."""
    key = re.sub(r"[\s_\-]", "", name.lower())
    canon = {re.sub(r"_", "", k): k for k in BENCHMARKS}
    found = canon.get(key) or _ALIASES.get(key)
    if found is None:
        raise ConfigError(f"unknown benchmark {name!r} (--benchmark); known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[found]
