"""Every check that needs no model, run by every entry point before anything heavy.

It collects ALL problems (plugins and options, model files, data files, seqlen, devices,
output folders, disk, tracking and registry) and raises one :class:`PreflightError`
that lists each with its fix.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wanda_pipeline.config import PipelineSpec, SaveSpec
from wanda_pipeline.datacheck import check_data, check_tokenizer
from wanda_pipeline.errors import ConfigError, OutputError, PreflightError, WandaPipelineError
from wanda_pipeline.modelcheck import model_problems
from wanda_pipeline.plugins import Registry, discover
from wanda_pipeline.quantizers.calibrated import calibrated_stats
from wanda_pipeline.regional.visitor import block_level_problems
from wanda_pipeline.sourcecheck import SourceFacts, can_write, check_model
from wanda_pipeline.stages import Plugins, build_plugins


@dataclass
class Output:
    """A folder (or file) an entry point will write."""

    path: str
    what: str
    overwrite: bool = False
    needs_bytes: int = 0
    hint: str = "choose a new folder, or pass --overwrite (pipelines: save.overwrite: true) to replace it"


@dataclass
class Checked:
    """What preflight validated: the plugins (created once, here) and the model's facts."""

    spec: PipelineSpec
    plugins: Plugins
    source: SourceFacts


def check_prunes_something(spec: PipelineSpec, plugins: Plugins, outputs: list[Output],
                           registers: bool) -> list[WandaPipelineError]:
    """Sparsity 0 is a dense measurement: allowed, but never saved or registered as a pruned model."""
    from wanda_pipeline.errors import ConfigError

    alloc = spec.allocation
    target = getattr(getattr(plugins.pruner, "config", None), "target_sparsity", None)
    if target is None or target > 0 or alloc.method == "owl" or any((alloc.ratios or {}).values()):
        return []
    fates = [f"saved to {o.path}" for o in outputs if o.what == "save folder"]
    name = spec.registration.model_name
    fates += [f"registered as {name!r}" if name else "registered"] if registers else []
    if not fates:
        return []
    return [ConfigError(f"pruner.sparsity is 0: nothing would be pruned, and the dense model would be "
                        f"{' and '.join(fates)} as if pruned. Give a sparsity in (0, 1), e.g. 0.5 (--sparsity_ratio); "
                        f"to only measure the dense model, leave out `save` (--save_model) and set "
                        f"register.enabled: false")]


def check_quantizer(spec: PipelineSpec, plugins: Plugins) -> list[WandaPipelineError]:
    """A calibration-free quantizer runs on the finished model, which a streamed run never holds."""
    q = plugins.quantizer
    if spec.engine.stream and q is not None and not calibrated_stats(q):
        return [ConfigError(f"quantizer {spec.quantizer.name!r} quantizes the finished model, which a streamed run "
                            f"(engine.stream) never holds in memory; use gptq (it quantizes inside the block loop) "
                            f"or drop engine.stream")]
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
            problems.append(OutputError(f"{out.what} {p} exists and is not empty; {out.hint}"))
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
    checkpoint = spec.engine.checkpoint_dir
    if checkpoint and checkpoint != "auto":
        # A folder with a checkpoint in it is resumed, or replaced with --no_resume; any other is the user's.
        from wanda_pipeline.engine.checkpoint import holds_checkpoint

        ours = holds_checkpoint(Path(checkpoint).expanduser())
        outs.append(Output(checkpoint, "checkpoint folder", overwrite=ours,
                           hint="it holds no checkpoint; choose an empty or new --checkpoint_dir"))
    return outs


def preflight(spec: PipelineSpec, tracker=None, outputs: list[Output] | None = None,
              registry: Registry | None = None) -> Checked:
    """Run every check; raise :class:`PreflightError` listing all problems, or return what was checked."""
    problems: list[WandaPipelineError] = []
    plugins = build_plugins(spec, registry or discover(), problems)  # each plugin's options validated once, here
    facts, file_problems = check_model(spec.model)
    tokenizer = None
    if not file_problems:  # the files are whole: what they say can be compared
        file_problems = model_problems(spec, facts)
        tokenizer, tokenizer_problems = check_tokenizer(facts.config_dir, spec.model.trust_remote_code)
        file_problems += tokenizer_problems
    problems += file_problems
    problems += check_data(spec, plugins, facts, tokenizer) + check_seqlens(spec, plugins, facts)
    problems += check_devices(spec, plugins)
    if plugins.pruner is not None:
        problems += block_level_problems(plugins.pruner, spec.reconstruct, spec.engine.passes, spec.pruner.name)
    problems += check_quantizer(spec, plugins)
    problems += _gates(spec, plugins)
    outs = list(outputs if outputs is not None else spec_outputs(spec))
    for o in outs:
        o.needs_bytes = o.needs_bytes or (facts.weight_bytes if "folder" in o.what and "log" not in o.what else 0)
    problems += check_outputs(outs, facts)
    if plugins.pruner is not None:
        problems += check_prunes_something(spec, plugins, outs, tracker is not None and spec.registration.enabled)
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
    """What ``validate`` adds without touching data or servers: (errors, notes). Errors: seqlen,
    include/exclude and per-layer ratios against a local model's config.json. Notes: devices this
    machine lacks (the file may be meant for another machine; preflight makes them errors at run time)."""
    problems: list[WandaPipelineError] = []
    plugins = build_plugins(spec, registry, problems)
    facts, file_problems = check_model(spec.model)
    config = [] if file_problems else [p for p in model_problems(spec, facts, weights=False) if p.exit_code == 2]
    blocks = block_level_problems(plugins.pruner, spec.reconstruct, spec.engine.passes, spec.pruner.name) \
        if plugins.pruner is not None else []
    return (config + check_seqlens(spec, plugins, facts) + blocks + _gates(spec, plugins),
            [str(p) for p in check_devices(spec, plugins)])


def _gates(spec: PipelineSpec, plugins: Plugins) -> list[WandaPipelineError]:
    """Gates that can never pass; only once every evaluator was made (else the plugin error says it)."""
    from wanda_pipeline.tracking.gate_checks import gate_problems

    return list(gate_problems(spec, plugins.evaluators)) if len(plugins.evaluators) == len(spec.evaluators) else []
