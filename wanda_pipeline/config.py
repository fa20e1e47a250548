"""The typed pipeline spec: pydantic models for one pipeline of ``pipelines.yaml``.

Reading, interpolating and validating a whole file lives in :mod:`wanda_pipeline.pipelines_file`.
Nothing here imports Prefect or MLflow."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wanda_pipeline.allocation import AllocationConfig
from wanda_pipeline.cron import check_cron
from wanda_pipeline.models import DTYPES
from wanda_pipeline.regional.config import ReconstructConfig

DEFAULT_FILE = "pipelines.yaml"
# MLflow's rule for aliases (letters, digits, '_' and '-'; not 'latest', not 'v<digits>').
_ALIAS = re.compile(r"^[\w\-]{1,255}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    source: str = Field(..., description="demo name, hub id, local folder or .gguf file")
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {sorted(DTYPES)}")
        return v


class CalibrationSpec(_Strict):
    source: str = Field("c4", description="c4, wikitext2, self, or a local .txt/.jsonl file")
    path: str | None = Field(None, description="a local file for a named source")
    nsamples: int = Field(128, gt=0)
    seqlen: int | None = Field(None, gt=0, description="default min(2048, model max)")
    seed: int = 0


class PluginSpec(BaseModel):
    """``name`` plus the plugin's own options, which its Config validates."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EngineSpec(_Strict):
    device: str = "cpu"
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1, description="calibration sequences per block forward; 'auto': from free memory (CUDA: free device "
                       "memory, CPU: available RAM). 1 is reference-exact; larger batches round differently")
    passes: Literal[1, 2] = Field(
        2, description="2: statistics forward, prune, second forward (reference-exact); 1: one forward of all "
                       "calibration sequences per block, each linear pruned before it runs (true-sequential)")
    threads: int | None = Field(None, gt=0, description="torch CPU threads while pruning; None: torch's default")
    offload_activations: bool = True
    include: str | None = Field(None, description="regex on linear names inside a block")
    exclude: str | None = None
    checkpoint_dir: str | None = Field(
        None, description="write a resumable checkpoint after every block here; 'auto': a cache folder keyed by "
                          "the run fingerprint; None: no checkpoints")
    resume: bool = Field(True, description="continue from a matching checkpoint in checkpoint_dir")
    keep_checkpoints: bool = Field(False, description="keep the checkpoint folder after a successful run")
    stream: bool = Field(False, description="stream weights block by block from safetensors shards (models "
                                            "bigger than host RAM); the pruned model is written as it goes")

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        try:
            re.compile(v or "")
        except re.error as exc:
            raise ValueError(f"{v!r} is not a valid regex ({exc}); e.g. 'mlp\\.down_proj'") from None
        return v


class GateSpec(_Strict):
    """Promotion gates; docs/evaluation.md says exactly what each one decides and how sure it is."""

    max_ppl_ratio: float | None = Field(None, gt=0, description="perplexity <= this x dense")
    min_zeroshot_ratio: float | None = Field(None, gt=0, description="zero-shot mean >= this x dense")
    min_sparsity: float | None = Field(None, ge=0, le=1, description="achieved sparsity >= this (default: target)")
    beat_champion: str | None = Field(None, description="metric that must beat the current champion's, by a paired "
                                      "test on the same examples at `confidence`")
    lower_is_better: bool | None = Field(None, description="direction of beat_champion's metric; default: from the "
                                         "metric (perplexity lower, accuracy higher)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="of every interval and test the gates use")
    bound: Literal["interval", "point"] = Field(
        "interval", description="ratio gates: 'interval' passes only when the whole interval at `confidence` is "
                                "within the limit; 'point' compares the point estimate (the interval is still "
                                "reported). beat_champion is always a paired test")


SaveFormat = Literal["hf", "bitmask-v1", "compressed-tensors"]


class RegisterSpec(_Strict):
    enabled: bool = True
    model_name: str | None = Field(None, description="registered model name; default: the pipeline name")
    alias: str = "champion"
    gates: GateSpec = Field(default_factory=GateSpec)
    compressed: bool = Field(True, description="store pruned weights as values + bitmask")
    format: SaveFormat | None = Field(None, description="format of the registered folder; default: "
                                      "bitmask-v1 if compressed else hf; compressed-tensors is what vLLM serves")

    @property
    def folder_format(self) -> str:
        return self.format or ("bitmask-v1" if self.compressed else "hf")

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not _ALIAS.match(v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"alias {v!r} is not valid: use letters, digits, '_' or '-' (e.g. 'champion'); "
                             f"'latest' and 'v<number>' are reserved")
        return v


class TrackingSpec(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "wanda-pipeline"


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        problem = check_cron(v)
        if problem:
            raise ValueError(f"cron {v!r} is not a valid cron expression: {problem}")
        return v


class SaveSpec(_Strict):
    """Where and how the pruned model is written (written to a temp folder, then renamed)."""

    path: str
    format: SaveFormat = Field("hf", description="hf (save_pretrained), compressed-tensors (vLLM) or bitmask-v1")
    overwrite: bool = Field(False, description="replace an existing non-empty folder")


class PipelineSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    description: str = ""
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    pruner: PluginSpec
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    reconstruct: ReconstructConfig | None = Field(
        None, description="after a pruner masks a block, fit its kept weights to the dense block's outputs")
    quantizer: PluginSpec | None = None
    evaluators: list[PluginSpec] = Field(default_factory=lambda: [PluginSpec(name="sparsity")])
    dense_baseline: bool = Field(True, description="also evaluate the dense model, for ratios and gates")
    registration: RegisterSpec = Field(default_factory=RegisterSpec, alias="register")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    schedule: ScheduleSpec | None = None
    save: SaveSpec | None = Field(None, description="also write the pruned model: a folder or {path, format}")

    @field_validator("save", mode="before")
    @classmethod
    def _save_path(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _reconstruct_needs_two_passes(self):
        if self.reconstruct is not None and self.engine.passes == 1:
            raise ValueError("reconstruct works on whole blocks (it runs each block forward again), which "
                             "engine.passes 1 cannot do; use engine.passes: 2 or remove reconstruct")
        return self

    @model_validator(mode="after")
    def _gates_need_evaluators(self):
        names = {e.name for e in self.evaluators}
        g = self.registration.gates
        if g.max_ppl_ratio is not None and "perplexity" not in names:
            raise ValueError("register.gates.max_ppl_ratio needs a 'perplexity' evaluator")
        if g.min_zeroshot_ratio is not None and "zeroshot" not in names:
            raise ValueError("register.gates.min_zeroshot_ratio needs a 'zeroshot' evaluator")
        ratios = [k for k in ("max_ppl_ratio", "min_zeroshot_ratio") if getattr(g, k) is not None]
        if ratios and not self.dense_baseline:
            raise ValueError(f"register.gates.{ratios[0]} compares with the dense model, but dense_baseline is false; "
                             f"set dense_baseline: true or remove the gate")
        return self


class SweepSpec(_Strict):
    pipeline: str
    sparsities: list[float] = Field(default_factory=list)
    pipelines: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_distinct_points(self):
        # No sparsities and no other pipelines would run the base pipeline once and call it a sweep.
        if not self.sparsities and not self.pipelines:
            raise ValueError(f"has no points: `sparsities` is empty and `pipelines` names no other pipeline than "
                             f"{self.pipeline!r}; give e.g. sparsities: [0.3, 0.5] or pipelines: [other]")
        repeated = sorted({s for s in self.sparsities if self.sparsities.count(s) > 1})
        names = [self.pipeline, *self.pipelines]
        repeated_names = sorted({n for n in names if names.count(n) > 1})
        if repeated or repeated_names:
            raise ValueError(f"the same point twice ({', '.join(map(str, repeated + repeated_names))}): each would "
                             f"run, track and register again; list each sparsity and pipeline once")
        return self


class PipelinesFile(_Strict):
    version: Literal[1] = 1
    defaults: dict[str, Any] = Field(default_factory=dict)
    pipelines: dict[str, PipelineSpec]
    sweeps: dict[str, SweepSpec] = Field(default_factory=dict)




def __getattr__(name: str):  # the file-level functions moved; old imports keep working
    from wanda_pipeline import pipelines_file

    if hasattr(pipelines_file, name):
        return getattr(pipelines_file, name)
    raise AttributeError(name)
