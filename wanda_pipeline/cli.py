"""The ``wanda-pipeline`` command.

``prune`` mirrors the reference repo's ``main.py``; ``run``, ``sweep``, ``serve`` and ``deploy`` go through the
Prefect flows; prune, run and sweep run preflight first and then the one stage sequence in
:mod:`wanda_pipeline.run`. ``validate``, ``list``, ``plugins`` and ``promote`` inspect or
change state. Exit codes: :mod:`wanda_pipeline.errors` (docs/failures.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from wanda_pipeline.cli_prune import add_prune_parser
from wanda_pipeline.cli_serving import add_serving_parsers
from wanda_pipeline.console import print_summary, print_table
from wanda_pipeline.errors import Interrupted, interrupt_behind, note_signal, signal_received


def load_pipelines_file(args, with_plugins: bool = True):
    from wanda_pipeline.pipelines_file import load_file
    from wanda_pipeline.plugins import discover

    return load_file(args.file, discover() if with_plugins else None)


def cmd_validate(args) -> int:
    from wanda_pipeline.errors import PreflightError
    from wanda_pipeline.plugins import discover
    from wanda_pipeline.preflight import preflight, static_problems

    doc = load_pipelines_file(args)
    registry = discover()
    for name, spec in doc.pipelines.items():
        problems, notes = static_problems(spec, registry)
        for note in notes:
            print(f"note: pipelines.{name}: {note} (on this machine)", file=sys.stderr)
        if args.deep and not problems:
            try:
                preflight(spec, registry=registry)
            except PreflightError as exc:
                problems = exc.problems
        if problems:
            exc = PreflightError(problems)
            exc.args = (f"pipelines.{name}: {exc}",)
            raise exc
    what = "preflight OK (model files, data, devices, outputs)" if args.deep else "seqlens checked (--deep: preflight)"
    print(f"{args.file}: OK, {len(doc.pipelines)} pipeline(s), {len(doc.sweeps)} sweep(s); {what}")
    return 0


def cmd_list(args) -> int:
    doc = load_pipelines_file(args)
    from wanda_pipeline.plugins import discover

    registry = discover()
    rows = []
    for n, p in doc.pipelines.items():
        pruner = registry.create("pruner", p.pruner.name, p.pruner.options()).config
        rows.append({"pipeline": n, "model": p.model.source, "pruner": p.pruner.name,
                     "sparsity": pruner.target_sparsity, "pattern": pruner.pattern,
                     "quantizer": p.quantizer.name if p.quantizer else "-",
                     "schedule": f"{p.schedule.cron} ({p.schedule.timezone})" if p.schedule else "-",
                     "description": p.description})
    print_table(rows, "pipelines")
    if doc.sweeps:
        print_table([{"sweep": n, "pipeline": s.pipeline, "sparsities": s.sparsities, "pipelines": s.pipelines}
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
        print_table(rows, "plugins")
    return 0


def _checked_spec(spec):
    """Preflight in this process, before Prefect starts, so bad input never waits for a server."""
    from wanda_pipeline.preflight import preflight
    from wanda_pipeline.tracking import MLflowTracker

    preflight(spec, MLflowTracker(spec.tracking.uri, spec.tracking.experiment))


def cmd_run(args) -> int:
    from wanda_pipeline.pipelines_file import pipeline_spec

    # The whole file must parse; plugins are checked for this pipeline only (in preflight), so one
    # broken plugin elsewhere in the file does not stop the others.
    spec = pipeline_spec(load_pipelines_file(args, with_plugins=False), args.name, args.set or [])
    _checked_spec(spec)
    from wanda_pipeline.orchestration.compress import compress
    from wanda_pipeline.orchestration.embedded import start_embedded_server

    start_embedded_server()  # one process at a time per PREFECT_HOME

    print_summary(compress(args.name, spec.model_dump(by_alias=True)))
    return 0


def cmd_sweep(args) -> int:
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.errors import ConfigError
    from wanda_pipeline.pipelines_file import sweep_overrides, sweep_points

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: needs at least 1")

    doc = sweep_overrides(load_pipelines_file(args, with_plugins=False), args.name, args.set or [])
    points = sweep_points(doc, args.name)
    saves = [PipelineSpec(**p["spec"]).save for p in points]
    paths = [s.path for s in saves if s is not None]
    if len(paths) != len(set(paths)):
        raise ConfigError(f"sweep {args.name!r}: several points would save to the same folder {paths}; "
                          f"remove `save` from the swept pipeline or save each point elsewhere")
    if args.pool is None and (args.workers or 1) == 1:  # one process, points one after another
        if args.devices:
            raise ConfigError("--devices needs --workers N (N >= 2) or --pool: it splits devices between workers")
        for point in points:  # one bad point would stop the loop: check them all first
            _checked_spec(PipelineSpec(**point["spec"]))
        from wanda_pipeline.orchestration.embedded import start_embedded_server
        from wanda_pipeline.orchestration.sweep import sweep

        start_embedded_server()
        print_table(sweep(args.name, points), f"sweep {args.name}")
        return 0
    from wanda_pipeline.errors import RunError
    from wanda_pipeline.orchestration.pool_sweep import run_sweep_on_pool
    from wanda_pipeline.scaleout import parse_devices

    table = run_sweep_on_pool(doc, args.name, args.workers or 0, args.pool, parse_devices(args.devices))
    print_table(table, f"sweep {args.name}")
    failed = [r["pipeline"] for r in table if r["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(table)} point(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return RunError.exit_code
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanda-pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="print tracebacks (or set WANDA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    add_prune_parser(sub)

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
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override every swept pipeline, as in `run`, e.g. calibration.nsamples=4")
    s.set_defaults(func=cmd_sweep)

    v = sub.add_parser("validate", help="check a pipelines file, listing every problem")
    v.add_argument("file", nargs="?", default="pipelines.yaml")
    v.add_argument("--deep", action="store_true", help="also preflight each pipeline (model files, data, ...)")
    v.set_defaults(func=cmd_validate)

    with_file(sub.add_parser("list", help="pipelines and their schedules")).set_defaults(func=cmd_list)

    pl = sub.add_parser("plugins", help="installed plugins, and broken ones with their error")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    add_serving_parsers(sub, with_file)
    return p


def _raise_interrupted(signum, _frame) -> None:
    note_signal(signum)
    raise Interrupted(signum)


def _interrupted(code: int, exc: BaseException | None = None) -> int:
    run = getattr(exc, "mlflow_run", None)
    which = f"the MLflow run {run[0]} ({run[1]})" if run else "the MLflow run"
    print(f"interrupted ({signal.Signals(code - 128).name}): {which} was ended as KILLED, nothing was "
          f"registered, no partial output was left", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from wanda_pipeline.cli_faults import embedded_server_running, quiet_libraries, report

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("WANDA_DEBUG", "") not in ("", "0")
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    note_signal(None)
    server_before = embedded_server_running()
    try:
        with quiet_libraries(args.command, bool(getattr(args, "tracking_uri", None)), debug):
            return args.func(args)
    except KeyboardInterrupt as exc:  # Interrupted is one; a bare KeyboardInterrupt is SIGINT
        return _interrupted(exc.exit_code if isinstance(exc, Interrupted) else 130, exc)
    except Exception as exc:  # mapped to its kind of fault (fault_map); what no row matches is a bug
        signum = signal_received() or interrupt_behind(exc)
        if signum is not None:  # e.g. an orchestrator's engine turning the signal into its own error
            return _interrupted(signum + 128, exc)
        return report(exc, debug, started_server=not server_before)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
