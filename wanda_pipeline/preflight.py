"""Every check that needs no model, run by every entry point before anything heavy.

It collects ALL problems (plugins and options, model files, data files, seqlen, devices,
output folders, disk, tracking and registry) and raises one :class:`PreflightError`
that lists each with its fix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanda_pipeline.config import PipelineSpec, SaveSpec
from wanda_pipeline.data import local_document_file
from wanda_pipeline.errors import DataError, OutputError, PreflightError, WandaPipelineError
from wanda_pipeline.plugins import Registry, discover
from wanda_pipeline.sourcecheck import SourceFacts, can_write, check_model, check_text_file
from wanda_pipeline.stages import Plugins, build_plugins


@dataclass
class Output:
    """A folder (or file) an entry point will write."""

    path: str
    what: str
    overwrite: bool = False
    needs_bytes: int = 0


@dataclass
class Checked:
    """What preflight validated: the plugins (created once, here) and the model's facts."""

    spec: PipelineSpec
    plugins: Plugins
    source: SourceFacts


def _offline(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def check_data(spec: PipelineSpec, plugins: Plugins) -> list[WandaPipelineError]:
    problems: list[WandaPipelineError] = []
    cal = spec.calibration
    needs_data = plugins.pruner is None or plugins.pruner.required_stats()  # unknown pruner: assume it does
    if needs_data and cal.source != "self":
        local = local_document_file(cal.source, "train", cal.path)
        if local is not None:
            problems += check_text_file(local, "calibration")
        elif _offline("HF_DATASETS_OFFLINE"):
            problems.append(DataError(f"calibration source {cal.source!r} has no local file and HF_DATASETS_OFFLINE=1; "
                                      f"set $WANDA_DATA_DIR to the data folder or give calibration.path"))
    for key, ev in plugins.evaluators.items():
        problems += _evaluator_data(key, ev.config)
    return problems


def _evaluator_data(key: str, cfg: Any) -> list[WandaPipelineError]:
    path = getattr(cfg, "path", None)
    if path:
        p = Path(path).expanduser()
        ok = p.exists() and p.stat().st_size > 0
        return [] if ok else [DataError(f"evaluator {key!r} reads {path!r}, which is missing or empty; fix its `path`")]
    dataset = getattr(cfg, "dataset", None)
    if dataset and local_document_file(dataset, "test" if dataset == "wikitext2" else "validation") is None \
            and _offline("HF_DATASETS_OFFLINE"):
        return [DataError(f"evaluator {key!r} needs {dataset!r}, which has no local file and HF_DATASETS_OFFLINE=1; "
                          f"set $WANDA_DATA_DIR to the data folder or give the evaluator a `path`")]
    if getattr(cfg, "source", None) == "local" and hasattr(cfg, "tasks"):
        from wanda_pipeline.evaluators.zeroshot import LOCAL_FILES
        from wanda_pipeline.settings import data_dir

        root = Path(cfg.data_dir) if getattr(cfg, "data_dir", None) else data_dir()
        missing = [t for t in cfg.tasks if root is None or not (root / LOCAL_FILES[t]).exists()]
        if missing:
            return [DataError(f"evaluator {key!r}: no local data for tasks {missing} under {root}; "
                              f"set its `data_dir` or $WANDA_DATA_DIR")]
    return []


def check_seqlens(spec: PipelineSpec, plugins: Plugins, facts: SourceFacts) -> list[WandaPipelineError]:
    from wanda_pipeline.errors import ConfigError

    limit = facts.max_positions
    if not limit:
        return []
    asked = [("calibration.seqlen", spec.calibration.seqlen)]
    asked += [(f"evaluator {k!r} seqlen", getattr(e.config, "seqlen", None)) for k, e in plugins.evaluators.items()]
    return [ConfigError(f"{where}={n} exceeds the model's maximum of {limit} positions (config.json); "
                        f"use at most {limit}") for where, n in asked if n and n > limit]


def check_devices(spec: PipelineSpec, plugins: Plugins) -> list[WandaPipelineError]:
    import torch

    wanted = [("engine.device", spec.engine.device)]
    wanted += [(f"evaluator {k!r} device", getattr(e.config, "device", None)) for k, e in plugins.evaluators.items()]
    problems: list[WandaPipelineError] = []
    for where, dev in wanted:
        if not dev:
            continue
        try:
            kind = torch.device(dev).type
        except (RuntimeError, ValueError):
            problems.append(OutputError(f"{where}: {dev!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'"))
            continue
        if kind == "cuda":
            index = torch.device(dev).index or 0
            if not torch.cuda.is_available():
                problems.append(OutputError(f"{where}: {dev!r} was asked for but this machine has no usable CUDA "
                                            f"GPU; use device 'cpu' or run where a GPU is visible"))
            elif index >= torch.cuda.device_count():
                problems.append(OutputError(f"{where}: {dev!r} does not exist; {torch.cuda.device_count()} GPU(s)"))
        elif kind == "mps" and not torch.backends.mps.is_available():
            problems.append(OutputError(f"{where}: 'mps' is not available here; use 'cpu'"))
    return problems


def _writable_ancestor(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if p.exists():
            return p if p.is_dir() and can_write(p) else None
    return None


def check_outputs(outputs: list[Output], facts: SourceFacts) -> list[WandaPipelineError]:
    problems: list[WandaPipelineError] = []
    for out in outputs:
        p = Path(out.path).expanduser()
        if facts.contains(p):
            problems.append(OutputError(f"{out.what} {p} is (or overlaps) the model source; writing there would "
                                        f"destroy the dense model. Choose another folder"))
            continue
        if p.exists() and not p.is_dir():
            problems.append(OutputError(f"{out.what} {p} is a file, not a folder; choose a folder path"))
            continue
        if p.is_dir() and any(p.iterdir()) and not out.overwrite:
            problems.append(OutputError(f"{out.what} {p} exists and is not empty; choose a new folder, or pass "
                                        f"--overwrite (pipelines: save.overwrite: true) to replace it"))
            continue
        base = _writable_ancestor(p)
        if base is None:
            problems.append(OutputError(f"{out.what} {p} cannot be written (no write permission); "
                                        f"choose a writable folder"))
            continue
        free = shutil.disk_usage(base).free
        if out.needs_bytes and free < out.needs_bytes * 1.1:
            problems.append(OutputError(f"{out.what} {p}: {free / 2**30:.2f} GiB free, the model needs about "
                                        f"{out.needs_bytes / 2**30:.2f} GiB; free space or choose another disk"))
    return problems


def check_tmp(needs_bytes: int) -> list[WandaPipelineError]:
    tmp = Path(tempfile.gettempdir())
    if not can_write(tmp):
        return [OutputError(f"temporary folder {tmp} is not writable; set TMPDIR to a writable folder")]
    free = shutil.disk_usage(tmp).free
    if needs_bytes and free < needs_bytes * 1.1:
        return [OutputError(f"temporary folder {tmp} has {free / 2**30:.2f} GiB free; the model needs about "
                            f"{needs_bytes / 2**30:.2f} GiB to be logged. Set TMPDIR to a bigger disk")]
    return []


def spec_outputs(spec: PipelineSpec, save: SaveSpec | None = None) -> list[Output]:
    outs = []
    save = save or spec.save
    if save is not None:
        outs.append(Output(save.path, "save folder", save.overwrite))
    checkpoint = getattr(spec.engine, "checkpoint_dir", None)  # added by the engine rewrite
    if checkpoint:
        # --no_resume starts over in a folder that holds a checkpoint (Checkpoint.start refuses any other)
        fresh_over_own = (Path(checkpoint) / "manifest.json").is_file()
        outs.append(Output(checkpoint, "checkpoint folder",
                           overwrite=bool(getattr(spec.engine, "resume", False)) or fresh_over_own))
    return outs


def preflight(spec: PipelineSpec, tracker=None, outputs: list[Output] | None = None,
              registry: Registry | None = None) -> Checked:
    """Run every check; raise :class:`PreflightError` listing all problems, or return what was checked."""
    problems: list[WandaPipelineError] = []
    plugins = build_plugins(spec, registry or discover(), problems)  # each plugin's options validated once, here
    facts, model_problems = check_model(spec.model)
    problems += model_problems
    problems += check_data(spec, plugins) + check_seqlens(spec, plugins, facts) + check_devices(spec, plugins)
    outs = list(outputs if outputs is not None else spec_outputs(spec))
    for o in outs:
        o.needs_bytes = o.needs_bytes or (facts.weight_bytes if "folder" in o.what and "log" not in o.what else 0)
    problems += check_outputs(outs, facts)
    if tracker is not None:
        problems += check_tmp(facts.weight_bytes)
        try:
            tracker.check(registry=spec.registration.enabled)
        except WandaPipelineError as exc:
            problems.append(exc)
    if problems:
        raise PreflightError(problems)
    return Checked(spec=spec, plugins=plugins, source=facts)


def static_problems(spec: PipelineSpec, registry: Registry) -> tuple[list[WandaPipelineError], list[str]]:
    """What ``validate`` adds without touching data or servers: (errors, notes). Errors: seqlen
    against a local model's config.json. Notes: devices this machine lacks (the file may be
    meant for another machine; preflight makes them errors at run time)."""
    problems: list[WandaPipelineError] = []
    plugins = build_plugins(spec, registry, problems)
    facts, _ = check_model(spec.model)
    return check_seqlens(spec, plugins, facts), [str(p) for p in check_devices(spec, plugins)]
