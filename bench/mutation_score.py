"""Read mutmut 3's results (mutants/**/*.py.meta) and print the mutation score of the core.

Usage: python bench/mutation_score.py [--by-module] [--survivors] [--mutants DIR]

The last line is always ``mutation score: K/N killed (P %)``. Killed counts mutants that a test
failed on or that timed out; every other verdict (survived, no tests, suspicious, not checked)
counts against the score. Mutants listed in EQUIVALENT (with a reason, in
bench/results/mutation.md) are left out of N. Functions outside the core in files that also hold
non-core code (data.py: hub and file loaders) are left out via OUT_OF_SCOPE.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {1, 3, 24, -24, 36, 152, 255}  # test failure, pytest internal error, timeouts (see mutmut.stats)
# Mutants that cannot change behaviour; each is explained in bench/results/mutation.md.
EQUIVALENT: set[str] = set()
# data.py: only the calibration sampler is core; loaders of hub/local files are tested elsewhere with data.
OUT_OF_SCOPE = re.compile(
    r"^wanda_pipeline\.data\.(x_(?!sample_windows)\w+|xǁWindowsǁ\w+)__mutmut_\d+$"
)


def load(mutants: Path) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def module_of(name: str) -> str:
    return name.split(".x")[0] if ".x" in name else name.rsplit(".", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=Path("mutants"))
    ap.add_argument("--by-module", action="store_true", help="a score line per module first")
    ap.add_argument("--survivors", action="store_true", help="list every mutant not killed first")
    args = ap.parse_args()
    results = {k: v for k, v in load(args.mutants).items() if k not in EQUIVALENT and not OUT_OF_SCOPE.match(k)}
    if not results:
        print("mutation score: 0/0 killed (no mutmut results; run `make mutants`)")
        return 1
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, code in results.items():
        per_module[module_of(name)]["killed" if code in KILLED else "alive"] += 1
    if args.by_module:
        for mod, c in sorted(per_module.items()):
            n = c["killed"] + c["alive"]
            print(f"{mod}: {c['killed']}/{n} killed ({100 * c['killed'] / n:.1f} %)")
    if args.survivors:
        for name, code in sorted(results.items()):
            if code not in KILLED:
                print(f"not killed (exit {code}): {name}")
    killed = sum(c["killed"] for c in per_module.values())
    total = len(results)
    print(f"mutation score: {killed}/{total} killed ({100 * killed / total:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
