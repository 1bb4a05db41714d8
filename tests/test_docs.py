"""docs/METHOD.md is the repository's account of the method: code, configs and docs cite its
numbered sections, never the specification the project was built from (users do not have it)."""

from __future__ import annotations

import re

from conftest import ROOT

METHOD = ROOT / "docs" / "METHOD.md"
# what a citation of the unpublished specification looks like (built so this file holds none)
SPEC_CITE = re.compile("|".join([r"PRISM" + "_SPEC", r"\bspec\s+sections?\b", r"\bspec\s*§", r"\(spec\s+\d"]), re.I)
METHOD_CITE = re.compile(r"METHOD\.md,?\s+sections?\s+(\d+(?:\.\d+)?(?:\s*(?:,|and|-|–)\s*\d+(?:\.\d+)?)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", re.M)


def cited_files():
    """Every text file users get: sources, configs, tests, benchmarks, README and docs."""
    for top in ("src", "configs", "tests", "bench", "docs"):
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".md", ".sh") and "egg-info" not in str(p):
                yield p
    yield ROOT / "README.md"


def method_headings() -> set[str]:
    return set(HEADING.findall(METHOD.read_text()))


def numbers(spec: str) -> list[str]:
    """``"5, 6 and 7"`` -> 5, 6, 7; ``"8-9"`` -> 8, 9; ``"6.1"`` -> 6.1."""
    out = []
    for part in re.split(r"\s*(?:,|\band\b)\s*", spec):
        ends = re.split(r"\s*[-–]\s*", part)
        out += [str(n) for n in range(int(ends[0]), int(ends[1]) + 1)] if len(ends) == 2 else [part]
    return out


def test_numbers_reads_lists_and_ranges():
    assert numbers("5, 6 and 7") == ["5", "6", "7"] and numbers("8-9") == ["8", "9"] and numbers("6.1") == ["6.1"]


def test_nothing_cites_the_specification():
    offenders = []
    for p in cited_files():
        if p.name == "test_docs.py":
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if SPEC_CITE.search(line):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "cite docs/METHOD.md section N instead:\n" + "\n".join(offenders)


def test_every_cited_method_section_exists():
    headings = method_headings()
    missing, seen = [], 0
    for p in cited_files():
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for m in METHOD_CITE.finditer(line):
                for n in numbers(m.group(1)):
                    seen += 1
                    if n not in headings:
                        missing.append(f"{p.relative_to(ROOT)}:{i}: section {n}")
    assert seen >= 30, seen   # the code does cite it
    assert not missing, "\n".join(missing)


def test_method_cross_references_exist():
    """Inside METHOD.md a plain "section N" refers to its own headings."""
    headings, missing = method_headings(), []
    for i, line in enumerate(METHOD.read_text().splitlines(), 1):
        for m in re.finditer(r"\bsections?\s+(\d+(?:\.\d+)?(?:\s*(?:,|and|-|–)\s*\d+(?:\.\d+)?)*)", line):
            missing += [f"line {i}: section {n}" for n in numbers(m.group(1)) if n not in headings]
    assert not missing, missing


def test_method_keeps_its_numbering():
    top = re.findall(r"^## (\d+)\. ", METHOD.read_text(), re.M)
    assert top == [str(n) for n in range(1, 12)]
    assert {"5.4", "6.1", "7.3", "7.7", "11.1"} <= method_headings()


def test_where_it_lives_names_real_functions():
    """Section 10 maps each piece to ``module.py``: ``name``; every name must be defined there."""
    text = METHOD.read_text()
    table = text[text.index("## 10. "):text.index("## 11. ")]
    checked, missing = 0, []
    for m in re.finditer(r"`([\w/]+\.py)`(?::\s*((?:`[\w.]+`(?:,\s*)?)+))?", table):
        path = ROOT / "src" / "prism_rl" / m.group(1)
        if not path.exists():
            missing.append(m.group(1))
            continue
        src = path.read_text()
        for name in re.findall(r"`([\w.]+)`", m.group(2) or ""):
            head, _, attr = name.partition(".")
            checked += 1
            if attr:
                found = re.search(rf"^class {head}\b.*?^    def {attr}\b", src, re.M | re.S)
            else:
                found = re.search(rf"^(?:def|class) {head}\b|^{head}\b[^\n]*=", src, re.M)
            if not found:
                missing.append(f"{m.group(1)}: {name}")
    assert checked >= 40 and not missing, missing


def test_readme_recipe_commands_parse_and_their_configs_load():
    """Every ``prism`` line of README's "With a real checkpoint" block is a valid command line,
    and the config each one names loads with its overrides (as the CLI would load it)."""
    from prism_rl.cli import build_parser
    from prism_rl.config import ALGO_PRESETS, AlignConfig, EvalConfig, RLConfig, SFTConfig, WarmupConfig, load_config

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## With a real checkpoint"):]
    block = section[section.index("```bash") + 7:]
    block = block[:block.index("```")].replace("\\\n", " ")
    env = dict(re.findall(r"\b([A-Z])=(\S+?);?(?=\s)", block)) | {"b": "MathVista"}
    classes = {"sft": SFTConfig, "warmup": WarmupConfig, "align": AlignConfig, "rl": RLConfig, "eval": EvalConfig}
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line.startswith("prism "):
            continue
        line = re.sub(r"\$(\w)", lambda m: env[m.group(1)], line)
        args = build_parser().parse_args(line.split()[1:])
        stage = {"disc": getattr(args, "disc_command", None), "data": getattr(args, "data_command", None)}.get(
            args.command) or args.command
        commands.append(stage)
        if getattr(args, "config", None):
            preset = ALGO_PRESETS[args.algo] if stage == "rl" else None
            cfg = load_config(classes[stage], ROOT / args.config, args.overrides, defaults=preset)
            assert cfg.output_dir.startswith("runs/qwen3vl-4b/")
    assert commands == ["sft", "init", "pairs", "warmup", "align", "filter-difficulty", "rl", "eval", "eval"]
