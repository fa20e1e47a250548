"""Engine speed: the product's prune stage against the paper code's procedure, same run.

Each configuration runs in its own process (load, C4 calibration windows, prune, a few
WikiText-2 perplexity windows); the parent compares prune time, perplexity and the
pruned-weight pattern with the reference procedure's (bench/reference_procedure.py).
Engine options that the installed engine does not offer (``passes``) are skipped, so
the script keeps working across engine versions. Also times mask selection and
statistics accumulation. Writes bench/results/speed.json and speed.md.

    python bench/bench_speed.py                         # demo model, 2 threads, 16 ppl windows
    python bench/bench_speed.py --batch-sizes 1 8 --eval-windows 40
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_core import machine  # noqa: E402
from micro_speed import mask_timing, stats_timing  # noqa: E402
from paper_code import commit, paper_prune, reference_dir  # noqa: E402

OUT = HERE / "results"
PAPER = "paper code (locuslab/wanda)"
PROCEDURE = "reference procedure"


def engine_options() -> set[str]:
    from wanda_pipeline.config import EngineSpec

    return set(EngineSpec.model_fields)


def configurations(args) -> list[tuple[str, dict | None]]:
    """(label, engine options); None for the paper code (first, when $WANDA_REFERENCE_DIR names a
    checkout: every ratio is against it) and the in-repo reference procedure."""
    have = engine_options()
    configs: list[tuple[str, dict | None]] = [(PAPER, None)] if reference_dir() else []
    configs.append((PROCEDURE, None))
    passes = [p for p in args.passes if p == 2 or "passes" in have]
    for p in passes:
        for bs in args.batch_sizes:
            opts = {"batch_size": bs}
            if "passes" in have:
                opts["passes"] = p
            configs.append((f"product passes={p} batch={bs}", opts))
    return configs


def save_pattern(model, path: Path) -> None:
    from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view

    _, blocks = find_blocks(model)
    bits = [linear_weight_view(lin).eq(0).flatten() for block in blocks for lin in find_linears(block).values()]
    np.save(path, np.packbits(torch.cat(bits).numpy()))


def run_one(label: str, opts: dict | None, args, pattern_file: Path) -> dict:
    """One row: the reference procedure (``opts`` None) on the library's loader and sampler, or
    the product's prune stage through the one run path, timed by its own stage clock."""
    torch.set_num_threads(args.threads)
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.data import wikitext2_test_tokens
    from wanda_pipeline.evaluators.perplexity import perplexity

    pruner = {"name": "wanda", "sparsity": args.sparsity, "pattern": args.pattern}
    spec = PipelineSpec(model={"source": args.model},
                        calibration={"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
                        pruner=pruner, engine=dict(opts or {}, device="cpu"), register={"enabled": False},
                        evaluators=[{"name": "sparsity"}], dense_baseline=False)
    load_before = os.getloadavg()[0]
    if opts is None:
        from reference_procedure import reference_prune

        from wanda_pipeline.data import calibration_windows, default_seqlen
        from wanda_pipeline.models import load_model

        model, tokenizer, info = load_model(args.model)
        tokens = calibration_windows("c4", tokenizer, args.nsamples, default_seqlen(info.max_positions, args.seqlen),
                                     0).tokens
        nm = tuple(int(x) for x in args.pattern.split(":")) if args.pattern != "unstructured" else None
        if label == PAPER:
            prune_s = paper_prune(model, tokens, args.sparsity, nm, reference_dir())
        else:
            t = time.perf_counter()
            reference_prune(model, tokens, args.sparsity, nm, keep_masks=False)
            prune_s = time.perf_counter() - t
    else:
        from wanda_pipeline.run import call, execute

        kept = {}

        def keep_loaded(name, fn, *a, cache_key=None):
            out = call(name, fn, *a, cache_key=cache_key)
            if name == "load":
                kept["loaded"] = out
            return out

        result = execute(spec, pipeline=label, run_stage=keep_loaded, progress=False)
        model, tokenizer = kept["loaded"].model, kept["loaded"].tokenizer
        prune_s = result.seconds["prune"]
    load_after = os.getloadavg()[0]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # load + prune, before evaluation
    save_pattern(model, pattern_file)
    tokens = wikitext2_test_tokens(tokenizer)
    ppl, used = perplexity(model, tokens, args.eval_seqlen, args.eval_windows, device="cpu", progress=False)
    return {"label": label, "engine": opts, "prune_s": prune_s, "ppl": ppl, "eval_windows": used,
            "peak_rss_mib": peak_rss_mib, "threads": torch.get_num_threads(), "loadavg_1min": [load_before, load_after]}


def table(record: dict) -> list[str]:
    runs = record["runs"]
    if not runs:
        return ["(no prune runs in this invocation)"]
    ref = runs[0]  # the paper code when it ran, else the reference procedure
    lines = [f"Baseline of every ratio and of the pattern agreement: {ref['label']}.", "",
             "| configuration | prune s | x baseline | peak RSS MiB | x baseline | WikiText-2 ppl | ppl vs baseline | "
             "pruned pattern = baseline | load avg (before, after) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rss = r.get("peak_rss_mib")
        rss_cells = f"{rss:.0f} | {rss / ref['peak_rss_mib']:.2f}" if rss and ref.get("peak_rss_mib") else "- | -"
        lines.append(f"| {r['label']} | {r['prune_s']:.1f} | {r['prune_s'] / ref['prune_s']:.2f} | {rss_cells} | "
                     f"{r['ppl']:.3f} | {100 * (r['ppl'] / ref['ppl'] - 1):+.2f} % | {100 * r['agreement']:.4f} % | "
                     f"{r['loadavg_1min'][0]:.1f}, {r['loadavg_1min'][1]:.1f} |")
    return lines


def render(record: dict) -> str:
    m = record["machine"]
    a = record["settings"]
    lines = [f"# Engine speed ({record['started']})", "", f"Command: `{record['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
             f"python {m['python']}; torch threads per run: {a['threads']}.", "",
             "Every figure is CPU. The load averages show whether other jobs shared the cores (on 2 cores "
             "anything above 2 means contention); the ratios compare runs of the same invocation.", "",
             f"Prune stage of {a['model']} (fp32), C4 {a['nsamples']}x{a['seqlen']}, Wanda {a['pattern']} "
             f"{a['sparsity'] if a['pattern'] == 'unstructured' else ''}; perplexity on the first "
             f"{a['eval_windows']} WikiText-2 test windows of {a['eval_seqlen']} tokens. One process per "
             "row; the reference procedure is bench/reference_procedure.py (batch 1, hooks, two passes "
             "per block, whole model on the device); the paper code is locuslab/wanda's own `prune_wanda` "
             f"at {record.get('paper_commit') or '(not run: set $WANDA_REFERENCE_DIR)'}, patched at run time by "
             "bench/paper_code.py. Peak RSS: the row's process after load and prune, before evaluation.", ""]
    lines += table(record)
    lines += [""] + [f"Note: {n}" for n in record.get("notes", [])]
    if record.get("skipped"):
        lines += ["", "Not measured (the installed engine does not offer them): " + ", ".join(record["skipped"])]
    if record.get("masks"):
        lines += ["", "## Mask selection (CPU, float32 random metric, best of repeats)", "",
                  "| shape | pattern | per-column loop s | old full sort / topk s | new s | x loop | x old |",
                  "|---|---|---|---|---|---|---|"]
        for r in record["masks"]:
            loop = f"{r['loop_s']:.3f}" if r.get("loop_s") else "-"
            xloop = f"{r['loop_s'] / r['new_s']:.1f}" if r.get("loop_s") else "-"
            lines.append(f"| {r['shape']} | {r['pattern']} | {loop} | {r['old_s']:.3f} | {r['new_s']:.4f} | "
                         f"{xloop} | {r['old_s'] / r['new_s']:.1f} |")
    if record.get("stats"):
        lines += ["", "## Statistics accumulation (col_sq_norm update, one calibration batch)", "",
                  "| input | variant | ms | x current | bit-equal to current |", "|---|---|---|---|---|"]
        for r in record["stats"]:
            lines.append(f"| {r['input']} | {r['variant']} | {1000 * r['s']:.2f} | {r['speedup']:.2f} | "
                         f"{r['bit_equal']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, nargs="*", default=[2, 1])
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1])
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--mask-repeats", type=int, default=3)
    p.add_argument("--skip-prune", action="store_true", help="only the micro-benchmarks")
    p.add_argument("--tag", default="speed")
    p.add_argument("--render", action="store_true", help="only rewrite <tag>.md from <tag>.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--pattern-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        opts = dict(configurations(args))[args.one]
        print("RESULT " + json.dumps(run_one(args.one, opts, args, Path(args.pattern_file))), flush=True)
        return

    if args.render:
        (OUT / f"{args.tag}.md").write_text(render(json.loads((OUT / f"{args.tag}.json").read_text())))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "settings": vars(args),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": [], "gpu": None}
    configs = [] if args.skip_prune else configurations(args)
    record["paper_commit"] = commit(reference_dir()) if reference_dir() else None
    record["skipped"] = [f"passes={p}" for p in args.passes if p != 2 and "passes" not in engine_options()]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, _) in enumerate(configs):
            pattern_file = Path(tmp) / f"{i}.npy"
            cmd = [sys.executable, __file__, "--one", label, "--pattern-file", str(pattern_file), *sys.argv[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(line[7:])
            bits = np.unpackbits(np.load(pattern_file))
            ref_bits = np.unpackbits(np.load(Path(tmp) / "0.npy"))  # the first row: the baseline
            run["agreement"] = float((bits == ref_bits).mean())
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
            (OUT / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
    torch.set_num_threads(args.threads)
    record["masks"] = mask_timing(args.mask_repeats)
    record["stats"] = stats_timing()
    (OUT / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
    (OUT / f"{args.tag}.md").write_text(render(record))
    print((OUT / f"{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
