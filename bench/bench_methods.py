"""Methods benchmark (issue 5's table): SmolLM2-135M, the same calibration and evaluation for
every row. Dense, magnitude, Wanda and SparseGPT at 50% unstructured, 2:4 and 4:8; Wanda and
OWL+Wanda at 60% and 70%; Wanda 50% with int8 and int4 RTN; the block-level pruners (issue 25):
Wanda++ and Wanda + regional reconstruction, with their default options.

On CPU the evaluation is a fixed slice: the first K WikiText-2 windows of 2048 tokens and
the first N examples of each zero-shot task (0: all of them). Both are recorded with the results,
and every number with its interval (docs/evaluation.md): perplexity with its 95% bootstrap
interval over windows, accuracies with lm-eval's standard error.

    python bench/bench_methods.py --eval-windows 32 --zeroshot-limit 500
    python bench/bench_methods.py --tag methods-blocklevel --zeroshot-limit 200 --paired-against "sparsegpt 2:4" \
        "wanda 2:4" --rows "wanda 2:4" "sparsegpt 2:4" "wanda++ 2:4" "wanda + reconstruct 2:4"
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402

ROWS = [
    ("dense", None, None, None),
    ("magnitude 50%", {"name": "magnitude", "sparsity": 0.5}, None, None),
    ("wanda 50%", {"name": "wanda", "sparsity": 0.5}, None, None),
    ("sparsegpt 50%", {"name": "sparsegpt", "sparsity": 0.5}, None, None),
    ("magnitude 2:4", {"name": "magnitude", "pattern": "2:4"}, None, None),
    ("wanda 2:4", {"name": "wanda", "pattern": "2:4"}, None, None),
    ("sparsegpt 2:4", {"name": "sparsegpt", "pattern": "2:4"}, None, None),
    ("magnitude 4:8", {"name": "magnitude", "pattern": "4:8"}, None, None),
    ("wanda 4:8", {"name": "wanda", "pattern": "4:8"}, None, None),
    ("sparsegpt 4:8", {"name": "sparsegpt", "pattern": "4:8"}, None, None),
    ("wanda 60%", {"name": "wanda", "sparsity": 0.6}, None, None),
    ("owl+wanda 60%", {"name": "wanda", "sparsity": 0.6}, {"method": "owl"}, None),
    ("wanda 70%", {"name": "wanda", "sparsity": 0.7}, None, None),
    ("owl+wanda 70%", {"name": "wanda", "sparsity": 0.7}, {"method": "owl"}, None),
    ("wanda 50% + int8", {"name": "wanda", "sparsity": 0.5}, None, {"name": "rtn", "bits": 8}),
    ("wanda 50% + int4", {"name": "wanda", "sparsity": 0.5}, None, {"name": "rtn", "bits": 4}),
    ("wanda 50% (self calibration)", {"name": "wanda", "sparsity": 0.5}, None, None),
    *[row for p, opts in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}), ("4:8", {"pattern": "4:8"}))
      for row in ((f"wanda++ {p}", {"name": "wanda++", **opts}, None, None),
                  (f"wanda + reconstruct {p}", {"name": "wanda", **opts}, None, None))],
]
RECONSTRUCT = {label for label, *_ in ROWS if "+ reconstruct" in label}  # the default ReconstructConfig
SELF_CALIBRATION = {"wanda 50% (self calibration)"}


def main() -> None:
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.run import execute

    p = argparse.ArgumentParser()
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--zeroshot-limit", type=int, default=500, help="examples per task; 0: every example")
    p.add_argument("--rows", nargs="*", help="labels to run (default: all)")
    p.add_argument("--paired-against", nargs="*", default=["dense", "wanda 50%"],
                   help="rows every other row is compared with, example by example")
    p.add_argument("--tag", default="methods")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the saved .json")
    p.add_argument("--note", help="a sentence printed under the settings (e.g. what disturbed the timings)")
    args = p.parse_args()
    if args.render_only:
        out = Path(__file__).parent / "results"
        record = json.loads((out / f"{args.tag}.json").read_text())
        if args.note:
            record["settings"]["note"] = args.note
            (out / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
        render(record, out / f"{args.tag}.md")
        return
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": vars(args), "runs": []}
    for label, pruner, allocation, quantizer in ROWS:
        if args.rows and label not in args.rows:
            continue
        source = "self" if label in SELF_CALIBRATION else "c4"  # data-free: text sampled from the model itself
        spec = PipelineSpec(
            model={"source": "smollm2-135m"}, pruner=pruner or {"name": "magnitude", "sparsity": 0.0},
            calibration={"source": source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
            allocation=allocation or {}, quantizer=quantizer, reconstruct={} if label in RECONSTRUCT else None,
            dense_baseline=False, register={"enabled": False},
            evaluators=[{"name": "perplexity", "seqlen": args.eval_seqlen, "windows": args.eval_windows},
                        {"name": "zeroshot", "limit": args.zeroshot_limit or None, "batch_size": 8},
                        {"name": "sparsity"}])
        examples: dict = {}
        result = execute(spec, pipeline=label, progress=False,  # the same seed and source give the same windows
                         run_stage=functools.partial(_keep_examples, into=examples))
        m = result.metrics
        row = {"method": label, "block_ratios": result.block_targets, "seconds": result.seconds,
               "ppl_wikitext2": m["ppl_wikitext2"], "eval_windows": result.protocols["perplexity"]["windows"],
               "zeroshot_mean": m["zeroshot_mean"], "sparsity": m["sparsity_total"],
               "zeroshot": {k.removeprefix("zeroshot_").removesuffix("_acc"): v for k, v in m.items()
                            if k.startswith("zeroshot_") and k.endswith("_acc")},
               "counters": {k: v for k, v in m.items() if k.startswith("counter_")},
               "ppl_ci": [m.get("ppl_wikitext2_ci_low"), m.get("ppl_wikitext2_ci_high")],
               "zeroshot_mean_stderr": m.get("zeroshot_mean_stderr"),
               "zeroshot_stderr": {k.removeprefix("zeroshot_").removesuffix("_acc_stderr"): v for k, v in m.items()
                                   if k.startswith("zeroshot_") and k.endswith("_acc_stderr")},
               "zeroshot_n": {k.removeprefix("zeroshot_").removesuffix("_n"): int(v) for k, v in m.items()
                              if k.startswith("zeroshot_") and k.endswith("_n") and k != "zeroshot_mean_n"}}
        row["examples"] = {k: v["values"] for k, v in examples.items() if "values" in v}  # for paired comparisons
        if quantizer:
            row["bits_per_weight"] = m["quant_bits_per_weight"]
            row["quant_model_bytes"] = m["quant_model_bytes"]
        record["runs"].append(row)
        (out_dir / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
        shown = {k: v for k, v in row.items() if k not in ("block_ratios", "zeroshot", "examples")}
        print(json.dumps(shown), flush=True)

    render(record, out_dir / f"{args.tag}.md")


def _keep_examples(stage: str, fn, *args, cache_key: str | None = None, into: dict):
    """A stage runner that calls the stage and keeps the evaluators' per-example results."""
    out = fn(*args)
    if stage == "evaluate":
        into.update({k: v for r in out.values() for k, v in r.examples.items()})
    return out


def paired_lines(record: dict, reference: str) -> list[str]:
    """Each row against ``reference`` on the same windows and examples: the perplexity ratio and
    the 7-task mean's accuracy difference, with paired 95% bootstrap intervals."""
    from wanda_pipeline.intervals import paired_accuracy, paired_log_ratio

    ref = next((r for r in record["runs"] if r["method"] == reference and r.get("examples")), None)
    if ref is None:
        return []
    tasks = list(ref["zeroshot"])
    lines = ["", f"Paired against {reference} (same windows, same examples; 95% paired bootstrap): perplexity "
             f"ratio, and the mean accuracy's difference over the tasks, in points.", "",
             f"| method | ppl / {reference} ppl | zero-shot mean - {reference} |", "|---|---|---|"]
    for r in record["runs"]:
        ex = r.get("examples") or {}
        if r is ref or "ppl_wikitext2" not in ex:
            continue
        ratio = paired_log_ratio(ex["ppl_wikitext2"], ref["examples"]["ppl_wikitext2"], 0.95)
        groups = [(ex[f"zeroshot_{t}_acc"], ref["examples"][f"zeroshot_{t}_acc"]) for t in tasks]
        diff, _ = paired_accuracy(groups, 0.95)
        lines.append(f"| {r['method']} | {ratio.point:.3f} [{ratio.low:.3f}, {ratio.high:.3f}] | "
                     f"{100 * diff.point:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] |")
    return lines


def _eval_seconds(s: dict) -> float:
    return s.get("evaluate", s.get("perplexity", 0) + s.get("zeroshot", 0))  # older records split the two


def _pm(value: float, stderr: float | None, digits: int) -> str:
    return f"{value:.{digits}f}" if stderr is None else f"{value:.{digits}f} ± {1.96 * stderr:.{digits}f}"


def render(record: dict, path: Path) -> None:
    """The markdown table, from the (possibly partial) JSON record."""
    a = record["settings"]
    done = {r["method"] for r in record["runs"]}
    missing = [label for label, *_ in ROWS if label not in done and (not a.get("rows") or label in a["rows"])]
    dense = next((r for r in record["runs"] if r["method"] == "dense"), None)
    tasks = list(record["runs"][0]["zeroshot"])
    n = record["runs"][0].get("zeroshot_n") or {}
    heads = [f"{t} (n={n[t]})" if t in n else t for t in tasks]
    lines = [f"# Methods benchmark ({record['started']})", "", f"Command: `{record['command']}`", "",
             f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, torch "
             f"{record['machine']['torch']}. Calibration: C4, {a['nsamples']} x {a['seqlen']}, seed 0 (same windows "
             f"for every row). Perplexity: first {a['eval_windows']} WikiText-2 test windows of {a['eval_seqlen']}. "
             f"Zero-shot: first {a['zeroshot_limit'] or 'all'} examples of each task, 0-shot, acc. "
             f"± is the 95% interval (perplexity: bootstrap over windows; accuracy: 1.96 x lm-eval's stderr).", "",
             *([a["note"], ""] if a.get("note") else []),
             "| method | sparsity | WikiText-2 ppl | x dense | 7-task mean | " + " | ".join(heads)
             + " | prune s | eval s |",
             "|---" * (7 + len(tasks)) + "|"]
    for r in record["runs"]:
        ratio = f"{r['ppl_wikitext2'] / dense['ppl_wikitext2']:.2f}" if dense else "-"
        s = r["seconds"]
        lo, hi = r.get("ppl_ci") or [None, None]
        ppl = f"{r['ppl_wikitext2']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")
        se = r.get("zeroshot_stderr", {})
        lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {ppl} | {ratio} | "
                     f"{_pm(r['zeroshot_mean'], r.get('zeroshot_mean_stderr'), 3)} | "
                     + " | ".join(_pm(r["zeroshot"][t], se.get(t), 2) for t in tasks)
                     + f" | {s.get('prune', 0) + s.get('quantize', 0):.0f} | {_eval_seconds(s):.0f} |")
    for reference in a.get("paired_against") or ["dense", "wanda 50%"]:  # older records: the fixed two
        lines += paired_lines(record, reference)
    if missing:
        lines += ["", f"Not finished in this run: {', '.join(missing)}."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
