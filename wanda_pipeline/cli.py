"""The ``wanda-pipeline`` command.

``prune`` mirrors the reference repo's ``main.py`` and runs the library directly;
``run``, ``sweep``, ``serve`` and ``deploy`` go through the Prefect flows; ``validate``, ``list``,
``plugins`` and ``promote`` inspect or change state. Exit codes come from
:mod:`wanda_pipeline.errors` (2 config, 3 plugin, 4 data, 5 run, 6 tracking).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wanda_pipeline.errors import ConfigError, WandaPipelineError


def _print_table(rows: list[dict], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    for c in cols:
        table.add_column(str(c))
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    Console(width=160).print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ---------------------------------------------------------------- prune (reference-style)
def _prune_spec(args):
    from wanda_pipeline.config import PipelineSpec

    evaluators = [{"name": "sparsity"}]
    if args.eval_windows != 0:
        evaluators.insert(0, {"name": "perplexity", "seqlen": args.eval_seqlen or args.seqlen,
                              "windows": args.eval_windows, "path": args.eval_path})
    pruner = {"name": args.prune_method, "sparsity": args.sparsity_ratio, "pattern": args.sparsity_type}
    if args.use_variant:
        pruner["use_variant"] = True
    try:
        return PipelineSpec(
            model={"source": args.model, "dtype": args.dtype},
            calibration={"source": args.calibration, "path": args.calibration_path, "nsamples": args.nsamples,
                         "seqlen": args.seqlen, "seed": args.seed},
            pruner=pruner,
            engine={"device": args.device, "batch_size": args.batch_size, "include": args.include,
                    "exclude": args.exclude},
            evaluators=evaluators,
            register={"enabled": False},
        )
    except Exception as exc:
        raise ConfigError(f"invalid flags: {exc}") from None


def cmd_prune(args) -> int:
    from wanda_pipeline import stages
    from wanda_pipeline.plugins import discover
    from wanda_pipeline.saving import save_model

    spec = _prune_spec(args)
    plugins = stages.build_plugins(spec, discover())
    clock = stages.StageClock()
    loaded = clock.timed("load", stages.load, spec.model)
    print(f"loaded {args.model}: {loaded.info.family}, {loaded.info.n_blocks} blocks at {loaded.info.blocks_path}")
    windows = None
    if plugins.pruner.required_stats():
        windows = clock.timed("calibrate", stages.calibrate, spec.calibration, loaded)
        print(f"calibration: {windows.nsamples} x {windows.seqlen} tokens from {windows.source} "
              f"(seed {windows.seed}, digest {windows.digest})")
    outcome = clock.timed("prune", stages.prune, loaded, windows, plugins.pruner, spec)
    results = clock.timed("evaluate", stages.evaluate, loaded.model, loaded.tokenizer, plugins.evaluators)
    sparsity = results["sparsity"].metrics["sparsity_total"]
    print("*" * 30)
    print(f"sparsity sanity check {sparsity:.4f}")
    ppl = None
    if "perplexity" in results:
        r = results["perplexity"]
        ppl = next(iter(r.metrics.values()))
        print(f"wikitext perplexity {ppl:.4f}  ({r.protocol['windows']} windows x {r.protocol['seqlen']} tokens)")
    print("*" * 30)
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in clock.seconds.items()))
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"log_{args.prune_method}.txt"
        with log.open("w") as f:
            print("method\tactual_sparsity\tppl_test", file=f)
            print(f"{args.prune_method}\t{sparsity:.4f}\t{ppl if ppl is not None else 'nan'}", file=f)
    if args.save_model:
        provenance = {
            "model": vars(loaded.info), "pruner": {"name": args.prune_method, **plugins.pruner.config.model_dump()},
            "calibration": {**spec.calibration.model_dump(), "digest": windows.digest if windows else None},
            "block_sparsity_targets": outcome.block_ratios, "sparsity_total": sparsity,
            "metrics": {k: v.metrics for k, v in results.items()},
        }
        save_model(loaded.model, loaded.tokenizer, args.save_model, provenance)
        print(f"saved pruned model to {args.save_model}")
    return 0


# ---------------------------------------------------------------- pipelines
def _load_file(args, with_plugins: bool = True):
    from wanda_pipeline.config import load_file
    from wanda_pipeline.plugins import discover

    return load_file(args.file, discover() if with_plugins else None)


def cmd_validate(args) -> int:
    doc = _load_file(args)
    print(f"{args.file}: OK, {len(doc.pipelines)} pipeline(s), {len(doc.sweeps)} sweep(s)")
    return 0


def cmd_list(args) -> int:
    doc = _load_file(args, with_plugins=False)
    rows = [{"pipeline": n, "model": p.model.source, "pruner": p.pruner.name,
             "sparsity": p.pruner.options().get("sparsity", 0.5),
             "pattern": p.pruner.options().get("pattern", "unstructured"),
             "quantizer": p.quantizer.name if p.quantizer else "-",
             "schedule": f"{p.schedule.cron} ({p.schedule.timezone})" if p.schedule else "-",
             "description": p.description} for n, p in doc.pipelines.items()]
    _print_table(rows, "pipelines")
    if doc.sweeps:
        _print_table([{"sweep": n, "pipeline": s.pipeline, "sparsities": s.sparsities, "pipelines": s.pipelines}
                      for n, s in doc.sweeps.items()], "sweeps")
    return 0


def cmd_plugins(args) -> int:
    from wanda_pipeline.plugins import discover

    reg = discover()
    rows = [{"kind": i.kind, "name": i.name, "package": i.package, "version": i.version, "entry point": i.value,
             "status": "ok"} for i in sorted(reg.plugins.values(), key=lambda i: (i.kind, i.name))]
    rows += [{"kind": b.kind, "name": b.name, "package": b.package, "version": b.version, "entry point": b.value,
              "status": f"BROKEN: {b.error}"} for b in reg.broken]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, "plugins")
    return 0


def cmd_run(args) -> int:
    from flows.compress import run_pipeline_by_name

    # The whole file must parse; plugins are checked for this pipeline only, so one broken
    # plugin elsewhere in the file does not stop the others.
    doc = _load_file(args, with_plugins=False)
    summary = run_pipeline_by_name(doc, args.name, args.set or [])
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    rows = [{"metric": k, "value": v} for k, v in summary["metrics"].items()]
    _print_table(rows, f"pipeline {summary['pipeline']}")
    reg = summary.get("registration")
    if reg:
        state = "PROMOTED to @" + reg["alias"] if reg["promoted"] else "registered, NOT promoted"
        print(f"model {reg['name']} version {reg['version']}: {state}")
        for g in reg.get("gates", []):
            print(f"  gate {g['name']}: {'pass' if g['passed'] else 'FAIL'} - {g['detail']}")
    if summary.get("mlflow_run_id"):
        print(f"mlflow run {summary['mlflow_run_id']} ({summary.get('tracking_uri')})")


def cmd_sweep(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: needs at least 1")
    doc = _load_file(args, with_plugins=False)
    if args.pool is None and (args.workers or 1) == 1:  # one process, points one after another
        if args.devices:
            raise ConfigError("--devices needs --workers N (N >= 2) or --pool: it splits devices between workers")
        from flows.compress import run_sweep_by_name

        _print_table(run_sweep_by_name(doc, args.name), f"sweep {args.name}")
        return 0
    from flows.pool_sweep import run_sweep_on_pool
    from wanda_pipeline.errors import RunError
    from wanda_pipeline.scaleout import parse_devices

    table = run_sweep_on_pool(doc, args.name, args.workers or 0, args.pool, parse_devices(args.devices))
    _print_table(table, f"sweep {args.name}")
    failed = [r["pipeline"] for r in table if r["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(table)} point(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return RunError.exit_code
    return 0


def cmd_serve(args) -> int:
    from flows.serve import serve_scheduled

    doc = _load_file(args)
    serve_scheduled(doc, names=args.names or None)
    return 0


def cmd_deploy(args) -> int:
    from flows.serve import deploy_scheduled

    doc = _load_file(args)
    for name, dep_id in deploy_scheduled(doc, names=args.names or None, pool=args.pool).items():
        print(f"deployment compress/{name} ({dep_id}) on work pool {args.pool!r}")
    print(f"start workers with: prefect worker start --pool {args.pool} --type process")
    return 0


def cmd_promote(args) -> int:
    from wanda_pipeline.tracking import MLflowTracker

    tracker = MLflowTracker(args.tracking_uri)
    tracker.promote(args.name, args.version, args.alias, reason=args.reason)
    print(f"model {args.name} version {args.version} now has alias @{args.alias} (manual override recorded)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanda-pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune one model, reference main.py style")
    pr.add_argument("--model", default="smollm2-135m", help="demo name, hub id, folder or .gguf")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--nsamples", type=int, default=128)
    pr.add_argument("--sparsity_ratio", type=float, default=0.5)
    pr.add_argument("--sparsity_type", default="unstructured", help="unstructured, 2:4, 4:8, any N:M")
    pr.add_argument("--prune_method", default="wanda", help="any installed pruner plugin")
    pr.add_argument("--use_variant", action="store_true", help="Wanda variant (per-row alpha search)")
    pr.add_argument("--save", help="folder for the results log")
    pr.add_argument("--save_model", help="folder to write the pruned model to")
    pr.add_argument("--calibration", default="c4", help="c4, wikitext2, self, or a .txt/.jsonl file")
    pr.add_argument("--calibration-path", dest="calibration_path", help="local file for a named source")
    pr.add_argument("--seqlen", type=int, help="calibration window; default min(2048, model max)")
    pr.add_argument("--eval-windows", dest="eval_windows", type=int, default=None,
                    help="evaluate only the first K WikiText-2 windows; 0 skips perplexity")
    pr.add_argument("--eval-seqlen", dest="eval_seqlen", type=int)
    pr.add_argument("--eval-path", dest="eval_path", help="local WikiText-2 test file")
    pr.add_argument("--dtype", default="float32")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    pr.add_argument("--include", help="regex: prune only linears whose name (inside a block) matches")
    pr.add_argument("--exclude", help="regex: leave matching linears dense, e.g. 'mlp\\.down_proj'")
    pr.set_defaults(func=cmd_prune)

    def with_file(sp):
        sp.add_argument("--file", "-f", default="pipelines.yaml")
        return sp

    r = with_file(sub.add_parser("run", help="run a named pipeline through Prefect"))
    r.add_argument("name")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. pruner.sparsity=0.6")
    r.set_defaults(func=cmd_run)

    s = with_file(sub.add_parser("sweep", help="run a named sweep; prints a results table"))
    s.add_argument("name")
    s.add_argument("--workers", type=int, help="run points in parallel on N local Prefect workers (default 1: "
                   "in this process, one after another)")
    s.add_argument("--pool", help="a process work pool on the server at PREFECT_API_URL whose workers run the points")
    s.add_argument("--devices", help="GPUs to split between the workers, e.g. 0,1 (each gets CUDA_VISIBLE_DEVICES)")
    s.set_defaults(func=cmd_sweep)

    v = sub.add_parser("validate", help="check a pipelines file, listing every problem")
    v.add_argument("file", nargs="?", default="pipelines.yaml")
    v.set_defaults(func=cmd_validate)

    with_file(sub.add_parser("list", help="pipelines and their schedules")).set_defaults(func=cmd_list)

    pl = sub.add_parser("plugins", help="installed plugins, and broken ones with their error")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    sv = with_file(sub.add_parser("serve", help="serve scheduled pipelines as Prefect deployments"))
    sv.add_argument("names", nargs="*")
    sv.set_defaults(func=cmd_serve)

    dp = with_file(sub.add_parser("deploy", help="register scheduled pipelines as deployments on a work pool"))
    dp.add_argument("names", nargs="*")
    dp.add_argument("--pool", default="wanda-pipeline", help="process work pool (created if missing)")
    dp.set_defaults(func=cmd_deploy)

    pm = sub.add_parser("promote", help="give a registered model version an alias by hand")
    pm.add_argument("name")
    pm.add_argument("version")
    pm.add_argument("--alias", default="champion")
    pm.add_argument("--reason", default="manual promotion")
    pm.add_argument("--tracking-uri", dest="tracking_uri")
    pm.set_defaults(func=cmd_promote)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WandaPipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
