"""Results as JSON, as a Markdown table, and as the harness's section of docs/PERFORMANCE.md.

The section sits between ``BEGIN`` and ``END`` markers; writing it replaces only what is between
them (the rest of the file is kept as it is). Without markers it goes before the file's first
"## " section (the headline numbers first), or at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

BEGIN = "<!-- bench/run.py begin -->"
END = "<!-- bench/run.py end -->"

UNITS = {"tokens/s": "{:,.0f} tok/s", "s/step": "{:.2f} s", "peak GiB": "{:.1f} GiB"}

METHOD = """\
How the columns are computed (`bench/harness/bounds.py` has the formulas):
- *ratio* is ours' speed-up over the peer: ours / peer for throughput, peer / ours for step times.
- *rollout*: tokens generated per second of wall time (host work included). The bound is the least
  time the job needs on this card: each distinct prompt prefilled once at the measured matmul rate,
  then per decode step max(bytes / copy bandwidth, FLOPs / matmul rate), where a step reads the
  bf16 text weights once plus the KV cache of every live row once. Compile / graph-capture time is
  the first call's extra time, reported in the notes and not in the rate.
- *train*: prompt + response tokens per second of forward + backward + AdamW step. MFU = model FLOPs
  / time / measured matmul rate, with model FLOPs = 3 x forward and forward = 2 (N_text x tokens +
  N_head x response tokens + N_vision x patches) + 2 L H d sum s^2 (causal attention) + vision
  attention; recomputation from gradient checkpointing is not counted.
- *GRPO step*: median wall time of one step after a warm-up step. Its bound is the rollout bound
  plus one forward + backward of the batch at the matmul rate.
- Models are random-init Qwen3-VL shapes (2B: text 2048 x 28, 4B: text 2560 x 36, vocab 151,936;
  vision 1024 x 24) behind a real Qwen3-VL processor (448 x 448 images: 196 image tokens)."""


def fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    return UNITS.get(metric, "{:.3g}").format(v)


def fmt_fraction(r: dict) -> str:
    f, pf = r.get("fraction"), r.get("peer_fraction")
    if f is None and pf is None:
        return ""
    head = ("MFU " if r["suite"] == "train" else "") + ("n/a" if f is None else f"{f:.1%}")
    return head + ("" if pf is None else f" (peer {pf:.1%})")


def calib_rows(calib: dict) -> list[str]:
    mm = calib["matmul_n"]
    return [f"| card: device-to-device copy, {calib['copy_bytes'] / 2**30:.2f} GiB (read + write) | | "
            f"{calib['copy_bytes_per_s'] / 1e12:.2f} TB/s | | | measured bandwidth ceiling |",
            f"| card: {calib['matmul_dtype']} matmul {mm} x {mm} x {mm} | | "
            f"{calib['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s | | | measured compute ceiling |"]


def table(result: dict) -> str:
    """The Markdown table: the card's two ceilings, then one line per row."""
    lines = ["| configuration | peer | ours | ratio | fraction of bound | notes |", "|---|---|---|---|---|---|"]
    lines += calib_rows(result["calib"])
    for r in result["rows"]:
        if r["note"].startswith("error") and r["ours"] is None and r["peer"] is None:
            lines.append(f"| {r['config']} | | | | | {r['note']} |")
            continue
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['config']} | {fmt_value(r['metric'], r['peer'])} | {fmt_value(r['metric'], r['ours'])} | "
                     f"{ratio} | {fmt_fraction(r)} | {r['note'].replace('|', '/')} |")
    return "\n".join(lines)


def legend(result: dict) -> str:
    """Who "peer" and "ours" are, per suite."""
    seen: dict[str, tuple[str, str]] = {}
    for r in result["rows"]:
        if r["peer_name"] or r["ours_name"]:
            seen.setdefault(r["suite"], (r["peer_name"], r["ours_name"]))
    return "\n".join(f"- {suite}: peer = {p or 'none'}; ours = {o}" for suite, (p, o) in seen.items())


def block(result: dict) -> str:
    m = result["meta"]
    head = (f"`{m['command']}` on one **{m['device']}** ({m['versions']}), {m['date']}, commit {m['commit']}, "
            f"{m['reps']} timed repetition(s) after a warm-up:")
    return "\n\n".join([head, table(result), legend(result)])


def section(results: list[dict]) -> str:
    body = "\n\n".join(block(r) for r in results)
    return (f"{BEGIN}\n## GPU: ours beside the peer, one process, one card (`bench/run.py`)\n\n"
            f"Written by `bench/run.py --write-docs`; compare ratios and fractions within one run.\n\n"
            f"{body}\n\n{METHOD}\n{END}")


def write_docs(path: Path, results: list[dict]) -> None:
    """Replace the harness's section of ``path`` (or add it); everything else stays as it was."""
    text = path.read_text() if path.exists() else "# Performance\n"
    new = section(results)
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + new + text[stop:]
    else:
        anchor = text.find("\n## ")
        text = (text[:anchor + 1] + new + "\n" + text[anchor:]) if anchor >= 0 else text.rstrip("\n") + "\n\n" + new + "\n"
    path.write_text(text)


def save(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))


def load(path: Path) -> dict:
    result = json.loads(Path(path).read_text())
    for key in ("meta", "calib", "rows"):
        if key not in result:
            raise ValueError(f"{path}: not a bench/run.py result (no '{key}')")
    return result
