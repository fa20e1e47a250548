"""The ``serve``, ``deploy`` and ``promote`` commands: scheduled pipelines as Prefect deployments,
and a manual alias on a registered model version."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def load_pipelines_file(args):
    from wanda_pipeline.cli import load_pipelines_file as load

    return load(args)


def cmd_serve(args) -> int:
    from wanda_pipeline.orchestration.serve import serve_scheduled

    doc = load_pipelines_file(args)
    try:
        serve_scheduled(doc, names=args.names or None)
    except OSError as exc:  # e.g. the runner's port is held by another program
        from wanda_pipeline.errors import OutputError

        raise OutputError(f"serve could not start: {exc}. If a port is in use, stop the program holding it or "
                          f"set PREFECT_RUNNER_SERVER_PORT to a free one") from exc
    return 0


def cmd_deploy(args) -> int:
    from wanda_pipeline.orchestration.serve import deploy_scheduled

    doc = load_pipelines_file(args)
    for name, dep_id in deploy_scheduled(doc, names=args.names or None, pool=args.pool).items():
        print(f"deployment compress/{name} ({dep_id}) on work pool {args.pool!r}")
    print(f"start workers with: prefect worker start --pool {args.pool} --type process")
    return 0


def cmd_promote(args) -> int:
    from wanda_pipeline.tracking import MLflowTracker, ModelRegistry

    ModelRegistry(MLflowTracker(args.tracking_uri)).set_alias(args.name, args.version, args.alias,
                                                              reason=args.reason, manual=True)
    print(f"model {args.name} version {args.version} now has alias @{args.alias} (manual override recorded)")
    return 0


def add_serving_parsers(sub, with_file: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
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
