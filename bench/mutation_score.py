"""Read mutmut 3's results (mutants/**/*.py.meta) and print the mutation score of the core.

Usage: python bench/mutation_score.py [--by-module] [--survivors] [--markdown FILE] [--mutants DIR]

The last line is always ``mutation score: K/N killed (P %)``. Killed: a test failed on the mutant
or it timed out. Every other verdict (survived, no tests, suspicious, not checked) counts against
the score. A surviving mutant whose change matches a rule in EQUIVALENT (a change that cannot alter
behaviour on this CPU-only test machine, each with its one-line reason) is reported as equivalent
and left out of N; the rules match the mutated code, not mutant numbers, so they survive edits.
In data.py only the calibration sampler is core (the file/hub loaders are tested with data).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutation_equivalents import EQUIVALENT  # bench/ is the script's folder, first on sys.path

KILLED = {1, 3, 24, -24, 36, 152, 255}  # test failure, pytest internal error, timeouts (see mutmut.stats)
# data.py: only the calibration sampler (the file/hub loaders are tested with data). promotion.py
# is scored whole: its registry calls run against tests/fake_registry.py.
IN_SCOPE = re.compile(r"^wanda_pipeline\.(?!data\.)|^wanda_pipeline\.data\.x_sample_windows__")


def load(mutants: Path) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def diffs(mutants: Path) -> dict[str, list[str]]:
    """Mutant name -> changed lines ('-' original, '+' mutant), from the generated sources."""
    out: dict[str, list[str]] = {}
    for src in sorted(mutants.rglob("*.py")):
        if not src.with_suffix(".py.meta").exists():
            continue
        module = ".".join(src.relative_to(mutants).with_suffix("").parts).removesuffix(".__init__")
        funcs = {n.name: ast.unparse(n).replace(n.name, "f", 1).splitlines()
                 for n in ast.walk(ast.parse(src.read_text()))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in n.name}
        for name, body in funcs.items():
            base, _, tag = name.rpartition("__mutmut_")
            if tag != "orig" and base + "__mutmut_orig" in funcs:
                orig = funcs[base + "__mutmut_orig"]
                out[f"{module}.{name}"] = [f"{line[0]} {line[1:].strip()}"
                                           for line in difflib.unified_diff(orig, body, lineterm="", n=0)
                                           if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return out


def equivalent(name: str, change: list[str]) -> str | None:
    old = [line[2:] for line in change if line.startswith("-")]
    new = [line[2:] for line in change if line.startswith("+")]
    text = " / ".join(change)
    for name_re, diff_re, strip_re, reason in EQUIVALENT:
        if not change or not re.search(name_re, name) or not re.search(diff_re, text):
            continue
        if strip_re is None or [re.sub(strip_re, "", x) for x in old] == [re.sub(strip_re, "", x) for x in new]:
            return reason
    return None


def module_of(name: str) -> str:
    return name.split(".x")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=Path("mutants"))
    ap.add_argument("--by-module", action="store_true", help="a score line per module first")
    ap.add_argument("--survivors", action="store_true", help="list every mutant not killed, with its change")
    ap.add_argument("--markdown", type=Path, help="write the per-module table and survivors as markdown")
    args = ap.parse_args()
    results = {k: v for k, v in load(args.mutants).items() if IN_SCOPE.match(k)}
    if not results:
        print("mutation score: 0/0 killed (no mutmut results; run `make mutants`)")
        return 1
    changes = diffs(args.mutants)
    per_module: dict[str, Counter] = defaultdict(Counter)
    open_, equiv = [], []
    for name, code in sorted(results.items()):
        mod = module_of(name)
        if code is None:  # not run yet (a run stopped early): neither killed nor a survivor
            per_module[mod]["not_run"] += 1
        elif code in KILLED:
            per_module[mod]["killed"] += 1
        elif code == 0 and (reason := equivalent(name, changes.get(name, []))):
            per_module[mod]["equivalent"] += 1
            equiv.append((name, reason))
        else:
            per_module[mod]["alive"] += 1
            open_.append((name, code))
    lines = []
    for mod, c in sorted(per_module.items()):
        n = c["killed"] + c["alive"]
        pct = f"{100 * c['killed'] / n:.1f} %" if n else "-"
        lines.append(f"{mod}: {c['killed']}/{n} killed ({pct}), {c['equivalent']} equivalent"
                     + (f", {c['not_run']} not run" if c["not_run"] else ""))
    killed = sum(c["killed"] for c in per_module.values())
    total = killed + sum(c["alive"] for c in per_module.values())
    not_run = sum(c["not_run"] for c in per_module.values())
    score = f"mutation score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f} %)" + (
        f"; {not_run} mutants not run (the run stopped early)" if not_run else "")
    if args.by_module:
        print("\n".join(lines))
    if args.survivors:
        for name, code in open_:
            print(f"not killed (exit {code}): {name}\n    " + "\n    ".join(changes.get(name, ["?"])))
    if args.markdown:
        md = ["| module | killed / counted | equivalent | not run |", "|---|---|---|---|"]
        md += [f"| {m} | {c['killed']}/{c['killed'] + c['alive']} | {c['equivalent']} | {c['not_run']} |"
               for m, c in sorted(per_module.items())]
        md += ["", f"**{score}**", "", "### Not killed", ""]
        md += [f"- `{n}` (exit {code}): `{' / '.join(changes.get(n, ['?']))}`" for n, code in open_] or ["(none)"]
        md += ["", "### Equivalent (left out of the score)", ""]
        md += [f"- `{n}`: {r} — `{' / '.join(changes.get(n, ['?']))}`" for n, r in equiv] or ["(none)"]
        args.markdown.write_text("\n".join(md) + "\n")
    print(score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
