"""Quantization benchmark (issue 22): sparse and int4 together on SmolLM2-135M, one run, the
same calibration windows for every row. Dense; Wanda 50 %, Wanda 2:4 and SparseGPT 50 %,
each alone, + RTN int4 g128 and + GPTQ int4 (group 128 and 64, act_order on, its default);
dense + GPTQ int4 as the quantization-only reference. WikiText-2
perplexity on the first K windows of 2048 tokens, the quantizer's own time, the sparsity
after quantization, and the exported compressed-tensors size (only where the group size
divides every linear: 64 does on SmolLM2, 128 does not, as 576 = 4.5 x 128, so g128 rows are
measured in memory only).

    python bench/bench_quantize.py                            # the full table (~hours on 2 CPU cores)
    python bench/bench_quantize.py --model DIR --eval-windows 1 --eval-seqlen 128 --nsamples 2 \\
        --seqlen 64 --rows dense "wanda 50% + gptq int4 g64" --tag smoke   # a smoke check on a tiny model
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402

NONE = {"name": "magnitude", "sparsity": 0.0}  # prunes nothing: the dense rows
PRUNERS = {"wanda 50%": {"name": "wanda", "sparsity": 0.5}, "wanda 2:4": {"name": "wanda", "pattern": "2:4"},
           "sparsegpt 50%": {"name": "sparsegpt", "sparsity": 0.5}}


def rows() -> list[tuple[str, dict, dict | None]]:
    """The issue's rows, the goal's first (so a cut-short run still answers it)."""
    out = [("dense", NONE, None)]
    for label, pruner in PRUNERS.items():
        out += [(label, pruner, None),
                (f"{label} + rtn int4 g128", pruner, {"name": "rtn", "bits": 4, "group_size": 128}),
                (f"{label} + gptq int4 g128", pruner, {"name": "gptq", "bits": 4, "group_size": 128}),
                (f"{label} + gptq int4 g64", pruner, {"name": "gptq", "bits": 4, "group_size": 64})]
        if label == "wanda 50%":
            out.append(("dense + gptq int4 g128", NONE, {"name": "gptq", "bits": 4, "group_size": 128}))
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def exportable(group: int, in_features: set[int]) -> bool:
    return all(group >= n or n % group == 0 for n in in_features)


def main() -> None:
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.models import find_blocks, find_linears
    from wanda_pipeline.run import execute

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--rows", nargs="*", help="labels to run (default: all)")
    p.add_argument("--tag", default="quantize")
    p.add_argument("--render-only", action="store_true", help="rewrite <tag>.md from the saved <tag>.json")
    args = p.parse_args()
    out_dir = Path(__file__).parent / "results"
    if args.render_only:
        render(json.loads((out_dir / f"{args.tag}.json").read_text()), out_dir / f"{args.tag}.md")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": vars(args), "runs": []}
    from wanda_pipeline.stages import load

    model = load(PipelineSpec(model={"source": args.model}, pruner=NONE).model).model
    in_features = {lin.in_features for b in find_blocks(model)[1] for lin in find_linears(b).values()}
    del model
    try:
        for label, pruner, quantizer in rows():
            if args.rows and label not in args.rows:
                continue
            save = None
            if quantizer and exportable(quantizer["group_size"], in_features):
                save = {"path": str(work / label.replace(" ", "_").replace("%", "")), "format": "compressed-tensors"}
            spec = PipelineSpec(
                model={"source": args.model}, pruner=pruner, quantizer=quantizer, save=save,
                calibration={"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
                dense_baseline=False, register={"enabled": False},
                evaluators=[{"name": "perplexity", "seqlen": args.eval_seqlen, "windows": args.eval_windows},
                            {"name": "sparsity"}])
            result = execute(spec, pipeline=label, progress=False)  # same seed and source: the same windows
            m = result.metrics
            row = {"method": label, "seconds": result.seconds, "ppl_wikitext2": m["ppl_wikitext2"],
                   "ppl_ci": [m.get("ppl_wikitext2_ci_low"), m.get("ppl_wikitext2_ci_high")],
                   "eval_windows": result.protocols["perplexity"]["windows"], "sparsity": m["sparsity_total"],
                   "counters": {k: v for k, v in m.items() if k.startswith("counter_")}}
            if quantizer:  # a pruned zero that moved fails the run, so a finished row kept all of them
                row.update(bits_per_weight=m["quant_bits_per_weight"], quant_seconds=m["quant_seconds"],
                           quant_model_bytes=m["quant_model_bytes"], pruned_zeros_kept=1.0)
            if result.saved:
                row["exported_bytes"] = folder_bytes(Path(result.saved))
                shutil.rmtree(result.saved, ignore_errors=True)
            record["runs"].append(row)
            (out_dir / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    render(record, out_dir / f"{args.tag}.md")


def render(record: dict, path: Path) -> None:
    a = record["settings"]
    runs = {r["method"]: r for r in record["runs"]}
    dense = runs.get("dense")
    lines = [f"# Quantization benchmark ({record['started']})", "", f"Command: `{record['command']}`", "",
             f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, torch "
             f"{record['machine']['torch']}. Model: {a['model']}. Calibration: C4, {a['nsamples']} x {a['seqlen']}, "
             f"seed 0 (the same windows for every row). Perplexity: first {a['eval_windows']} WikiText-2 test "
             f"windows of {a['eval_seqlen']}; [95% interval, bootstrap over windows].", "",
             "| method | sparsity | ppl | x dense | x unquantized | bits/weight | prune stage s | quantizer s "
             "| pruned zeros kept | exported MB |", "|---" * 10 + "|"]
    for r in record["runs"]:
        base = runs.get(next((p for p in [*PRUNERS, "dense"] if r["method"].startswith(p)), ""))
        vs_dense = f"{r['ppl_wikitext2'] / dense['ppl_wikitext2']:.2f}" if dense else "-"
        vs_base = f"{r['ppl_wikitext2'] / base['ppl_wikitext2']:.3f}" if base and base is not r else "-"
        q = r.get("bits_per_weight")
        kept = "-" if q is None else f"{r['pruned_zeros_kept']:.0%}"
        bits = "-" if q is None else f"{q:.3f}"
        size = f"{r['exported_bytes'] / 1e6:.0f}" if "exported_bytes" in r else ("-" if q is None else "n/a")
        lo, hi = r.get("ppl_ci") or (None, None)
        ppl = f"{r['ppl_wikitext2']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")
        quant_s = "-" if q is None else f"{r['quant_seconds']:.1f}"
        lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {ppl} | {vs_dense} | {vs_base} | "
                     f"{bits} | {r['seconds'].get('prune', 0):.0f} | {quant_s} | {kept} | {size} |")
    lines += ["", "n/a: the group size does not divide every linear (SmolLM2: 576 % 128 = 64), so compressed-tensors "
              "cannot store it; measured in memory only.",
              "Prune stage s: the block loop, which for GPTQ rows also holds the Gram accumulation, the GPTQ solve "
              "and the recomputed block outputs; quantizer s: the quantizer's own time (GPTQ's solve, RTN's rounding).",
              "Sparsity after GPTQ/RTN can exceed the pruned 50 %: weights whose code is 0 dequantize to 0.",
              *record.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
