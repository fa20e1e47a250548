"""The block-level pruning visitor: a pruner's masks, plus what needs the whole block.

Per block: (1) a pruner with ``block_stats(ctx)`` adds per-linear statistics computed from the
whole block (Wanda++'s regional gradients) to the engine's; (2) the pruner masks every linear
exactly as :class:`~wanda_pipeline.pruning.PruneVisitor` does; (3) with a reconstruction
config, regional optimisation fits the kept weights to the dense block's outputs. The
engine then recomputes the block's outputs for the next block. The checkpoint state is the
masks, or the weights once they were optimised.
"""

from __future__ import annotations

from wanda_pipeline.engine import BlockContext
from wanda_pipeline.errors import ConfigError, PluginError
from wanda_pipeline.models import linear_weight_view
from wanda_pipeline.plugins import Pruner
from wanda_pipeline.pruning import PruneVisitor
from wanda_pipeline.regional.config import ReconstructConfig
from wanda_pipeline.regional.optimise import optimise


def own_reconstruct(pruner: Pruner) -> ReconstructConfig | None:
    """The regional optimisation a pruner does itself (Wanda++: its ``ro`` option)."""
    return getattr(pruner, "reconstruct", None)


def is_block_level(pruner: Pruner, reconstruct: ReconstructConfig | None = None) -> bool:
    return reconstruct is not None or hasattr(pruner, "block_stats") or own_reconstruct(pruner) is not None


def block_level_problems(pruner: Pruner, reconstruct: ReconstructConfig | None, passes: int,
                         name: str = "the pruner") -> list[ConfigError]:
    """What preflight refuses before any model is loaded."""
    problems = []
    if reconstruct is not None and own_reconstruct(pruner) is not None:
        problems.append(ConfigError(f"pruner {name!r} does its own regional optimisation (its option `ro`); remove "
                                    f"the pipeline's `reconstruct`, or set the pruner's `ro` instead"))
    if passes == 1 and is_block_level(pruner, reconstruct):
        what = "`reconstruct`" if reconstruct is not None else f"pruner {name!r}"
        problems.append(ConfigError(f"{what} works on whole blocks (it runs each block forward again for gradients "
                                    f"or reconstruction), which engine.passes 1 cannot do; use engine.passes: 2"))
    return problems


class BlockPruneVisitor(PruneVisitor):
    one_pass = False  # refused with passes=1 by the engine (and by preflight first)

    def __init__(self, pruner: Pruner, ratios: list[float], reconstruct: ReconstructConfig | None = None):
        super().__init__(pruner, ratios)
        self.reconstruct = reconstruct if reconstruct is not None else own_reconstruct(pruner)
        self.counters = {"reconstruct_steps": 0.0}

    def visit_block(self, ctx: BlockContext) -> bool:
        stats = ctx.stats
        block_stats = getattr(self.pruner, "block_stats", None)
        if block_stats is not None:
            try:
                extra = block_stats(ctx)
            except Exception as exc:
                raise PluginError(f"pruner {type(self.pruner).__name__} crashed computing block {ctx.index}'s "
                                  f"statistics: {type(exc).__name__}: {exc}") from exc
            for name, more in extra.items():
                stats[name] = {**stats.get(name, {}), **more}
        self.visit(ctx.index, ctx.block, ctx.linears, stats)
        cfg = self.reconstruct
        if cfg is not None and cfg.iterations > 0:
            steps = optimise(ctx, self.masks, cfg)
            self.counters["reconstruct_steps"] += steps
            state = self.block_state(ctx.index, ctx.linears)
            for name, lin in ctx.linears.items():  # optimised weights are this block's state now
                state.pop(f"{name}.mask", None)
                state[f"{name}.weight"] = linear_weight_view(lin).detach().to("cpu", copy=True)
        return True
