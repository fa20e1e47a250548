"""Choose Wanda++'s defaults on held-out data: C4 *validation* perplexity (the calibration
windows come from C4 train), never the WikiText-2 test set that bench_reconstruct.py reports.

Each configuration runs in its own process through the one run path, on the demo model, with
the same calibration windows; the record keeps its prune time next to Wanda's from the same run.

    python bench/tune_reconstruct.py --configs configs.json --tag reconstruct_tuning

``configs.json`` maps a label to {"pruner": {...}, "reconstruct": {...} | null}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402


def run_one(args, config: dict) -> dict:
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.run import execute

    spec = PipelineSpec(model={"source": args.model}, pruner=config["pruner"],
                        reconstruct=config.get("reconstruct"),
                        calibration={"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
                        dense_baseline=False, register={"enabled": False},
                        evaluators=[{"name": "perplexity", "dataset": "c4", "seqlen": 2048,
                                     "windows": args.eval_windows}])
    result = execute(spec, pipeline="tune", progress=False)
    m = result.metrics
    return {"ppl_c4": m["ppl_c4"], "ci": [m.get("ppl_c4_ci_low"), m.get("ppl_c4_ci_high")],
            "prune_s": result.seconds.get("prune")}


def render(record: dict, path: Path) -> None:
    """The record as a table, each row against the Wanda row of its pattern from the same record."""
    m = record["machine"]
    lines = ["# Choosing the regional-optimisation defaults (held-out C4 validation)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}. "
             f"Model {record['settings']['model']} (float32). Calibration: C4 train, "
             f"{record['settings']['nsamples']} x {record['settings']['seqlen']}, seed 0, the same windows for every "
             f"row. Perplexity: the first {record['settings']['eval_windows']} C4 validation windows of 2048 "
             "[95% interval, bootstrap over windows], never the WikiText-2 test set. Each row in its own process, "
             "one at a time. Command of each row: `" + record["rows"][0]["command"] + "` (configs listed below).",
             "", "| configuration | C4 val ppl [95% CI] | vs Wanda | prune s | x Wanda time | finished |",
             "|---|---|---|---|---|---|"]
    base = {}
    for r in record["rows"]:
        if r["pruner"]["name"] == "wanda" and not r.get("reconstruct"):
            base[r["pruner"].get("pattern", r["pruner"].get("sparsity"))] = r
    for r in record["rows"]:
        w = base.get(r["pruner"].get("pattern", r["pruner"].get("sparsity")))
        vs = "-" if w is None or w is r else f"{r['ppl_c4'] / w['ppl_c4'] - 1:+.1%}"
        ratio = "-" if w is None or w is r else f"{r['prune_s'] / w['prune_s']:.2f}"
        lo, hi = r["ci"]
        lines.append(f"| {r['label']} | {r['ppl_c4']:.2f} [{lo:.2f}, {hi:.2f}] | {vs} | {r['prune_s']:.0f} | "
                     f"{ratio} | {r['finished']} |")
    lines += ["", "Configurations:", ""]
    lines += [f"- {r['label']}: pruner `{json.dumps(r['pruner'])}`, reconstruct `{json.dumps(r.get('reconstruct'))}`"
              for r in record["rows"]]
    path.write_text("\n".join(lines + [""] + record.get("notes", [])) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", help="JSON file: label -> {pruner, reconstruct}")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the saved .json")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--tag", default="reconstruct_tuning")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(__file__).parent / "results" / f"{args.tag}.json"
    if args.render_only:
        render(json.loads(out.read_text()), out.with_suffix(".md"))
        return
    if not args.configs:
        p.error("--configs is required")
    configs = json.loads(Path(args.configs).read_text())
    if args.one:
        print("ROW " + json.dumps(run_one(args, configs[args.one])), flush=True)
        return
    record = json.loads(out.read_text()) if out.exists() else {
        "machine": machine(), "settings": {k: v for k, v in vars(args).items() if k not in ("one", "configs")},
        "rows": []}
    for label, config in configs.items():
        start = time.time()
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", label], capture_output=True,
                              text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            print(f"{label}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        row = {"label": label, **config, **json.loads(found[-1][4:]), "wall_s": round(time.time() - start),
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        record["rows"].append(row)
        out.write_text(json.dumps(record, indent=2))
        render(record, out.with_suffix(".md"))
        print(f"{label}: c4 ppl {row['ppl_c4']:.2f} prune {row['prune_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
