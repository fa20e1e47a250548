"""Core benchmark: SmolLM2-135M, C4 calibration, full WikiText-2 test perplexity.

Each method runs in its own subprocess so its peak RSS is its own. Writes
bench/results/core.json and bench/results/core.md (machine, versions, command included).

    python bench/bench_core.py                     # all methods (about an hour on 2 CPU cores)
    python bench/bench_core.py --eval-windows 8    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = {
    "dense": None,
    "wanda-50%": {"name": "wanda", "sparsity": 0.5},
    "wanda-2:4": {"name": "wanda", "pattern": "2:4"},
    "wanda-4:8": {"name": "wanda", "pattern": "4:8"},
    "magnitude-50%": {"name": "magnitude", "sparsity": 0.5},
}
OUT = Path(__file__).parent / "results"


def machine() -> dict:
    import transformers

    mem = None
    try:
        mem = int(open("/proc/meminfo").read().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}


def run_one(label: str, args) -> dict:
    """One method in this process, on the one run path (``run.execute``): stage times and peak RSS."""
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.run import execute

    pruner = METHODS[label] or {"name": "magnitude", "sparsity": 0.0}  # dense: prune nothing
    spec = PipelineSpec(model={"source": args.model},
                        calibration={"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
                        pruner=pruner, engine={"device": args.device}, dense_baseline=False,
                        evaluators=[{"name": "perplexity", "seqlen": args.eval_seqlen, "windows": args.eval_windows,
                                     "device": args.device}, {"name": "sparsity"}],
                        register={"enabled": False})
    result = execute(spec, pipeline=label, progress=False)
    m = result.metrics
    return {"method": label, "ppl_wikitext2": m["ppl_wikitext2"],
            "eval_windows": result.protocols["perplexity"]["windows"],
            "eval_seqlen": args.eval_seqlen, "sparsity": m["sparsity_total"], "seconds": result.seconds,
            "peak_rss_bytes": int(m["peak_rss_bytes"])}


def nm_timing(repeats: int = 5) -> dict:
    """Vectorised N:M masks against the reference's loop over column groups, SmolLM2 shapes."""
    from wanda_pipeline.sparsity import nm_mask

    def column_loop(metric, n, m):
        mask = torch.zeros_like(metric, dtype=torch.bool)
        for ii in range(metric.shape[1]):
            if ii % m == 0:
                tmp = metric[:, ii : ii + m].float()
                mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
        return mask

    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down
    g = torch.Generator().manual_seed(0)
    metrics = [torch.rand(s, generator=g) for s in shapes]
    out = {}
    for n, m in [(2, 4), (4, 8)]:
        for fn_name, fn in [("vectorised", nm_mask), ("column_loop", column_loop)]:
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for x in metrics:
                    fn(x, n, m)
                best = min(best, time.perf_counter() - t)
            out[f"{n}:{m} {fn_name}"] = best
        assert all(torch.equal(nm_mask(x, n, m), column_loop(x, n, m)) for x in metrics)
        out[f"{n}:{m} speedup"] = out[f"{n}:{m} column_loop"] / out[f"{n}:{m} vectorised"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="default: all (full WikiText-2 test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="core")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return

    OUT.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": vars(args), "runs": []}
    record["nm_mask_timing_s"] = nm_timing()
    for label in args.methods:
        cmd = [sys.executable, __file__, "--one", label] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        record["runs"].append(json.loads(line[7:]))
        (OUT / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record["runs"][-1]), flush=True)
    dense = next((r["ppl_wikitext2"] for r in record["runs"] if r["method"] == "dense"), None)
    lines = [f"# Core benchmark ({record['started']})", "", f"Command: `{record['command']}`", "",
             f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, "
             f"torch {record['machine']['torch']}, transformers {record['machine']['transformers']}", "",
             "| method | sparsity | WikiText-2 ppl | x dense | load s | calibrate s | prune s | eval s "
             "| peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        s = r["seconds"]
        ratio = f"{r['ppl_wikitext2'] / dense:.2f}" if dense else "-"
        lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {r['ppl_wikitext2']:.2f} | {ratio} | "
                     f"{s['load']:.1f} | {s.get('calibrate', 0):.1f} | {s.get('prune', 0):.1f} | "
                     f"{s['evaluate']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    nm = record["nm_mask_timing_s"]
    lines += ["", "N:M mask computation over SmolLM2's four linear shapes (best of 5):", "",
              "| pattern | vectorised s | column loop s | speedup |", "|---|---|---|---|"]
    for pat in ["2:4", "4:8"]:
        lines.append(f"| {pat} | {nm[pat + ' vectorised']:.4f} | {nm[pat + ' column_loop']:.4f} | "
                     f"{nm[pat + ' speedup']:.1f}x |")
    (OUT / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
