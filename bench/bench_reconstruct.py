"""Block-level pruning benchmark (issue 25): Wanda, SparseGPT, Wanda++ (score only), Wanda++
(score + regional optimisation) and Wanda + reconstruction, at 50% unstructured, 2:4 and 4:8,
on the demo model with the same calibration windows for every row.

Each row runs in its own process (so peak RSS and peak device memory are the row's own) through
the one run path. Zero-shot intervals are the binomial 95% interval of each task's accuracy over
the examples it evaluated.

    python bench/bench_reconstruct.py --eval-windows 32 --zeroshot-limit 200          # the table
    python bench/bench_reconstruct.py --model /tmp/tiny --calibration /tmp/c.txt \\
        --nsamples 4 --seqlen 64 --eval-seqlen 64 --eval-windows 2 --no-zeroshot --rows "wanda++ 2:4"  # smoke
    python bench/bench_reconstruct.py --synthetic-7b 4 --dtype bfloat16 --device cuda --nsamples 128 \\
        --seqlen 2048 --tag reconstruct-7b       # GPU: time and peak memory per block, LLaMA-7B-shaped blocks

With ``--synthetic-7b LAYERS`` the model is a random LLaMA-7B-shaped one (``--synthetic-scale S``
divides its widths, for a smoke run) with the demo tokenizer; only time and memory mean anything
there, so it is evaluated for sparsity alone.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402

PATTERNS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}


def rows(ro: dict, alpha: float | None = None) -> list[tuple[str, dict, dict | None]]:
    """(label, pruner spec, reconstruct spec) for every configuration; options left out of ``ro``
    (and ``alpha``) take the plugins' defaults."""
    out: list[tuple[str, dict, dict | None]] = [("dense", {"name": "magnitude", "sparsity": 0.0}, None)]
    score = {} if alpha is None else {"alpha": alpha}
    for p, opts in PATTERNS.items():
        out += [(f"wanda {p}", {"name": "wanda", **opts}, None),
                (f"sparsegpt {p}", {"name": "sparsegpt", **opts}, None),
                (f"wanda++ score only {p}", {"name": "wanda++", **opts, **score, "ro": {**ro, "iterations": 0}}, None),
                (f"wanda++ {p}", {"name": "wanda++", **opts, **score, "ro": ro}, None),
                (f"wanda + reconstruct {p}", {"name": "wanda", **opts}, ro)]
    return out


def run_one(args, label: str) -> dict:
    """One row, in this process."""
    import torch

    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.run import execute

    _, pruner, reconstruct = next(r for r in rows(ro_options(args), args.alpha) if r[0] == label)
    evaluators = [{"name": "perplexity", "seqlen": args.eval_seqlen, "windows": args.eval_windows,
                   "device": args.device}, {"name": "sparsity"}]
    if args.synthetic_7b:
        evaluators = [{"name": "sparsity"}]  # random weights: time and memory only
    elif not args.no_zeroshot:
        evaluators.insert(1, {"name": "zeroshot", "limit": args.zeroshot_limit, "batch_size": 8})
    calibration = {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    if args.calibration:
        calibration = {**calibration, "source": args.calibration}
    spec = PipelineSpec(model={"source": args.model, "dtype": args.dtype}, pruner=pruner, reconstruct=reconstruct,
                        calibration=calibration, engine={"device": args.device}, dense_baseline=False,
                        register={"enabled": False}, evaluators=evaluators)
    result = execute(spec, pipeline=label, progress=False)
    m = result.metrics
    n = json.loads(result.protocols.get("zeroshot", {}).get("n_samples", "{}") or "{}")
    zeroshot = {}
    for key, acc in m.items():
        if key.startswith("zeroshot_") and key.endswith("_acc"):
            task = key.removeprefix("zeroshot_").removesuffix("_acc")
            half = 1.96 * math.sqrt(acc * (1 - acc) / n[task]) if n.get(task) else float("nan")
            zeroshot[task] = {"acc": acc, "ci95": half, "n": n.get(task)}
    device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"method": label, "ppl_wikitext2": m.get("ppl_wikitext2"), "sparsity": m.get("sparsity_total"),
            "ppl_ci": [m.get("ppl_wikitext2_ci_low"), m.get("ppl_wikitext2_ci_high")],
            "eval_windows": result.protocols.get("perplexity", {}).get("windows"),
            "zeroshot_mean": m.get("zeroshot_mean"),
            "zeroshot": zeroshot, "prune_s": result.seconds.get("prune"), "seconds": result.seconds,
            "peak_rss_bytes": m.get("peak_rss_bytes"), "peak_device_bytes": device_peak,
            "blocks": result.params["model"]["n_blocks"],
            "counters": {k: v for k, v in m.items() if k.startswith("counter_")}}


def synthetic_model(args, folder: Path) -> str:
    """A random LLaMA-7B-shaped model with ``args.synthetic_7b`` blocks and the demo tokenizer."""
    import torch
    from bench_latency import LLAMA_7B
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from wanda_pipeline.models import DTYPES, demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir("smollm2-135m"))
    shape = {**LLAMA_7B, "num_hidden_layers": args.synthetic_7b, "vocab_size": len(tokenizer)}
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        shape[k] //= args.synthetic_scale
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, max_position_embeddings=4096),
                                             dtype=DTYPES[args.dtype])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def ro_options(args) -> dict:
    """The regional-optimisation options given on the command line (the rest: the defaults)."""
    given = {"iterations": getattr(args, "ro_iterations", None), "samples": getattr(args, "ro_samples", None),
             "lr": getattr(args, "ro_lr", None), "optimizer": getattr(args, "ro_optimizer", None)}
    return {k: v for k, v in given.items() if v is not None}


def ro_described(a: dict) -> str:
    from wanda_pipeline.pruners.wandapp import WandaPPConfig
    from wanda_pipeline.regional.config import ReconstructConfig

    ro = ReconstructConfig(**ro_options(argparse.Namespace(**a))).model_dump()
    alpha = a.get("alpha") if a.get("alpha") is not None else WandaPPConfig().alpha
    return f"{json.dumps(ro)}; Wanda++ alpha {alpha:g}"


def render(record: dict, path: Path) -> None:
    a, runs = record["settings"], record["runs"]
    dense = next((r for r in runs if r["method"] == "dense"), None)
    wanda = {r["method"].split()[-1]: r for r in runs if r["method"].startswith("wanda ") and "+" not in r["method"]}
    lines = [f"# Block-level pruning benchmark ({record['started']})", "", f"Command: `{record['command']}`", "",
             f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, torch "
             f"{record['machine']['torch']}. Model {a['model']} ({a['dtype']}). "
             f"Calibration: {a['calibration'] or 'c4'}, "
             f"{a['nsamples']} x {a['seqlen']}, seed 0, the same windows for every row. Perplexity: first "
             f"{a['eval_windows']} WikiText-2 test windows of {a['eval_seqlen']} [95% interval, bootstrap over "
             f"windows]. Regional optimisation: "
             f"{ro_described(a)}. Each row in its own process.", "",
             "| method | sparsity | WikiText-2 ppl | x dense | vs Wanda | zero-shot mean | prune s | x Wanda time "
             "| prune s per block | peak RSS GiB | peak device GiB |", "|---" * 11 + "|"]
    def ci(r: dict) -> str:
        lo, hi = r.get("ppl_ci") or (None, None)
        return "" if lo is None else f" [{lo:.2f}, {hi:.2f}]"

    for r in runs:
        w = wanda.get(r["method"].split()[-1])
        ppl = r["ppl_wikitext2"]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['method']} | {fmt(r['sparsity'], '.3f')} | {fmt(ppl, '.2f')}{ci(r)} | "
            f"{fmt(ppl / dense['ppl_wikitext2'] if dense and ppl else None, '.2f')} | "
            f"{fmt(ppl / w['ppl_wikitext2'] - 1 if w and ppl and r is not w else None, '+.1%')} | "
            f"{fmt(r['zeroshot_mean'], '.3f')} | {fmt(r['prune_s'], '.0f')} | "
            f"{fmt(r['prune_s'] / w['prune_s'] if w and r['prune_s'] and w['prune_s'] else None, '.2f')} | "
            f"{fmt(r['prune_s'] / r['blocks'] if r['prune_s'] and r.get('blocks') else None, '.2f')} | "
            f"{fmt(r['peak_rss_bytes'] / 2**30 if r['peak_rss_bytes'] else None, '.2f')} | "
            f"{fmt(r['peak_device_bytes'] / 2**30 if r['peak_device_bytes'] else None, '.2f')} |")
    zs = [r for r in runs if r["zeroshot"]]
    if zs:
        tasks = list(zs[0]["zeroshot"])
        lines += ["", "Zero-shot accuracy ± binomial 95% interval:", "",
                  "| method | " + " | ".join(tasks) + " |", "|---" * (1 + len(tasks)) + "|"]
        lines += [f"| {r['method']} | " + " | ".join(f"{r['zeroshot'][t]['acc']:.3f} ± {r['zeroshot'][t]['ci95']:.3f}"
                                                  for t in tasks) + " |" for r in zs]
    done = {r["method"] for r in runs}
    missing = [label for label, _, _ in rows(ro_options(argparse.Namespace(**a)), a.get('alpha')) if label not in done]
    if missing:
        lines += ["", f"Not run in this record: {', '.join(missing)}."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def append_to(path: Path, record: dict) -> dict:
    """The saved record at ``path``, with this invocation's command added; refused when the
    settings that decide the numbers differ."""
    old = json.loads(path.read_text())
    keep = ("rows", "append", "tag", "render_only")
    a = {k: v for k, v in old["settings"].items() if k not in keep}
    b = {k: v for k, v in record["settings"].items() if k not in keep}
    if a != b:
        sys.exit(f"--append: {path} was measured with other settings: {a} != {b}")
    old["command"] = f"{old['command']}; then {record['command']}"
    return old


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calibration", default=None, help="a local .txt/.jsonl instead of C4")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--zeroshot-limit", type=int, default=200)
    p.add_argument("--no-zeroshot", action="store_true")
    p.add_argument("--ro-iterations", type=int, help="default: the ReconstructConfig default")
    p.add_argument("--ro-samples", type=int, help="default: the ReconstructConfig default")
    p.add_argument("--ro-lr", type=float, help="default: the ReconstructConfig default")
    p.add_argument("--ro-optimizer", choices=["rmsprop", "adam", "sgd"], help="default: the ReconstructConfig default")
    p.add_argument("--alpha", type=float, help="Wanda++'s alpha (default: the plugin's)")
    p.add_argument("--synthetic-7b", type=int, metavar="LAYERS", help="a random LLaMA-7B-shaped model instead")
    p.add_argument("--synthetic-scale", type=int, default=1, help="divide the synthetic model's widths (smoke)")
    p.add_argument("--rows", nargs="*", help="labels to run (default: all)")
    p.add_argument("--tag", default="reconstruct")
    p.add_argument("--append", action="store_true", help="add rows to the saved record of the same settings")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the saved .json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this row, print its JSON
    args = p.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args, args.one)), flush=True)
        return
    out_dir = Path(__file__).parent / "results"
    if args.render_only:
        render(json.loads((out_dir / f"{args.tag}.json").read_text()), out_dir / f"{args.tag}.md")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "one"}
    child_args = sys.argv[1:]
    if args.synthetic_7b:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="wanda-7b-shaped-"))
        settings["model"] = f"random LLaMA-7B-shaped, {args.synthetic_7b} blocks, widths / {args.synthetic_scale}"
        child_args = [*child_args, "--model", synthetic_model(args, folder)]
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": settings, "runs": []}
    if args.append:  # continue a record: same settings, so the rows stay comparable
        record = append_to(out_dir / f"{args.tag}.json", record)
    known = [label for label, _, _ in rows(ro_options(args), args.alpha)]
    unknown = sorted(set(args.rows or []) - set(known))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {known}")
    for label in args.rows or known:  # in the order given, so the rows that matter most run first
        done = subprocess.run([sys.executable, __file__, *child_args, "--one", label], capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            print(f"{label}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        record["runs"].append(json.loads(found[-1][4:]))
        (out_dir / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
        print(found[-1][4:], flush=True)
    render(record, out_dir / f"{args.tag}.md")
    if args.synthetic_7b:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
