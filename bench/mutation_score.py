"""Read mutmut 3's results (mutants/**/*.py.meta) and print the mutation score of the core.

Usage: python bench/mutation_score.py [--by-module] [--survivors] [--markdown FILE] [--mutants DIR]

The last line is always ``mutation score: K/N killed (P %)``. Killed: a test failed on the mutant
or it timed out. Every other verdict (survived, no tests, suspicious, not checked) counts against
the score. A surviving mutant whose change matches a rule in EQUIVALENT (a change that cannot alter
behaviour on this CPU-only test machine, each with its one-line reason) is reported as equivalent
and left out of N; the rules match the mutated code, not mutant numbers, so they survive edits.
In data.py only the calibration sampler is core (the file/hub loaders are tested with data); in
promotion.py only the pure policy `decide`.
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

KILLED = {1, 3, 24, -24, 36, 152, 255}  # test failure, pytest internal error, timeouts (see mutmut.stats)
# data.py: only the calibration sampler; promotion.py: only the pure policy (the registry calls
# around it need a tracking server and are tested with one).
IN_SCOPE = re.compile(r"^wanda_pipeline\.(?!data\.|tracking\.promotion\.)|^wanda_pipeline\.data\.x_sample_windows__"
                      r"|^wanda_pipeline\.tracking\.promotion\.x_decide__")
# Equivalent mutants: (regex on the name, regex on the diff, regex to strip, reason). The diff is
# the '-' (original) and '+' (mutant) lines joined by " / ". With a strip regex, the mutant is
# equivalent only if removing its matches makes both lines identical. Rules name code, not mutant
# numbers, so they survive renumbering; only survivors (exit 0) are classified.
CPU = "a no-op on this CPU-only machine"
EQUIVALENT: list[tuple[str, str, str | None, str]] = [
    (r"", r"tqdm\(", r",? ?(desc|leave|disable|unit)=[^,)]*", "progress bar only (tqdm description/leave/disable)"),
    (r"", r"reshape\(", r"reshape\((1, )?-1\)", "a 1-D vector broadcasts like the (1, n) row it was"),
    (r"x_sparsegpt_prune__", r"topk\(score", r",? ?dim=1", "2-D score: topk's default dim -1 is dim 1"),
    (r"x_sparsegpt_prune__", r"weight\.copy_\(W\.to\(", r"W\.to\((weight\.dtype|None)\)",
     "copy_ casts to the weight's dtype anyway"),
    (r"", r"progress: bool=", r"progress: bool=(True|False)", "progress bar default only"),
    (r"x_perplexity__", r"batch_size: int=", r"batch_size: int=\d",
     "default batch size; perplexity is batch-size invariant (tested for 1, 2, 3)"),
    (r"x_perplexity__", r"^- nll = torch\.zeros", r",? ?dtype=[\w.]+",
     "float32 instead of float64 accumulator: precision only, far below the tests' 1e-6 at these sizes"),
    (r"perplexity\.", r"model_device|\.to\((device|None)\)|c\.device\)|c\.batch_size(, None)?\)", None,
     f"device placement, {CPU}"),
    (r"", r"device=", r",? ?device=[\w.]+", f"device argument, {CPU}"),
    (r"x_make_accumulators__", r"in_features, ", r", (device|None)\)", f"device argument, {CPU}"),
    (r"", r"dtype=", r",? ?dtype=(torch\.float32|h\.dtype|None)", "dtype: float32 is the default and H's dtype"),
    (r"inverse_hessian_cholesky__", r"h\.shape", r"h\.shape\[[01]\]", "H is square"),
    (r"", r"stable=", r",? ?stable=(True|False|None)", "torch.sort on CPU is stable whatever `stable` says"),
    (r"", r"(sort|topk)\(", r",? ?dim=-1", "torch.sort/topk default to dim=-1"),
    (r"x_(per_row|variant)_mask__", r"dim=", r"dim=[-+]1", "2-D metric: dim=+1 is dim=-1"),
    (r"x_nm_mask__", r"zeros_like", r",? ?dtype=(torch\.bool|None)", "a 0/1 float mask copied into a bool mask"),
    (r"x_sparsegpt_prune__", r"\+ .*i - nm\[1\] <= count", None,
     "unreachable through the pruner: blocksize % M == 0 keeps i + M <= count"),
    (r"x_quantize_rtn__", r"\+ deq = torch\.clamp\(torch\.round\(g / scale\), "
     r"(None, qmax|-qmax - 1, None|-qmax - 1|-qmax - 2, qmax)\) \* scale$", None,
     "symmetric clamp cannot bind: the scale maps the group's max |w| to qmax"),
    (r"x_quantize_rtn__", r"\+ deq = \(torch\.clamp\(torch\.round\(g / scale\) \+ zero, None, qmax\) - zero\)", None,
     "asymmetric lower bound cannot bind: round(x) + round(-x) = 0 under round-half-even"),
    (r"x_quantize_rtn__", r"\+ g = w\.reshape\(-1, group_size\)$", None, "the same groups, flattened over rows"),
    (r"x_check_nm__", r"\+ if m (< 0|<= 1) or n <= 0 or n >= m:$", None, "n >= m already rejects m <= 1 when n >= 1"),
    (r"x_nm_mask__", r"\+ if full == 1:$", None, "full is a multiple of m >= 2, never 1"),
    (r"x_variant_mask__", r"\+ while abs\(achieved - sparsity\) >=? tol and hi - lo >=? tol:$", None,
     "exact float equality with tol does not occur (hi - lo = 0.8 / 2^k)"),
    (r"x_variant_mask__", r"\+ if achieved >= sparsity:$", None, "equality already ended the loop"),
    (r"ColumnSqNorm\w*_add__", r"\+ self\.value \+= torch\.norm\(x, (p=None, )?dim=1\) \*\* 2 / self\.nsamples$", None,
     "the default norm is the 2-norm"),
    (r"x_owl_ratios__", r"\+ scaled = \(lod \+ lod\.min\(\)\) / span", None,
     "centering (scaled - mean) removes a shift"),
    (r"OutlierScan\w*visit__", r"^- return False / \+ return True$", None,
     "re-forwarding unchanged weights gives the same outputs (time only)"),
    (r"x_sample_windows__", r"\+ return torch\.cat\(windows\)$", None, "torch.cat's default dim is 0"),
]


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
        if code in KILLED:
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
        lines.append(f"{mod}: {c['killed']}/{n} killed ({100 * c['killed'] / n:.1f} %), {c['equivalent']} equivalent")
    killed = sum(c["killed"] for c in per_module.values())
    total = killed + sum(c["alive"] for c in per_module.values())
    score = f"mutation score: {killed}/{total} killed ({100 * killed / total:.1f} %)"
    if args.by_module:
        print("\n".join(lines))
    if args.survivors:
        for name, code in open_:
            print(f"not killed (exit {code}): {name}\n    " + "\n    ".join(changes.get(name, ["?"])))
    if args.markdown:
        md = ["| module | killed / counted | equivalent |", "|---|---|---|"]
        md += [f"| {m} | {c['killed']}/{c['killed'] + c['alive']} | {c['equivalent']} |" for m, c in
               sorted(per_module.items())]
        md += ["", f"**{score}**", "", "### Not killed", ""]
        md += [f"- `{n}` (exit {code}): `{' / '.join(changes.get(n, ['?']))}`" for n, code in open_] or ["(none)"]
        md += ["", "### Equivalent (left out of the score)", ""]
        md += [f"- `{n}`: {r} — `{' / '.join(changes.get(n, ['?']))}`" for n, r in equiv] or ["(none)"]
        args.markdown.write_text("\n".join(md) + "\n")
    print(score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
