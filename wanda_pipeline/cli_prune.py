"""``wanda-pipeline prune``: the reference repo's ``main.py`` flags, on the one run path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wanda_pipeline.errors import ConfigError


def add_prune_parser(sub) -> argparse.ArgumentParser:
    pr = sub.add_parser("prune", help="prune one model, reference main.py style")
    pr.add_argument("--model", default="smollm2-135m", help="demo name, hub id, folder or .gguf")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--nsamples", type=int, default=128)
    pr.add_argument("--sparsity_ratio", type=float, default=None, help="default 0.5; N:M patterns fix it to N/M")
    pr.add_argument("--sparsity_type", default="unstructured", help="unstructured, 2:4, 4:8, any N:M")
    pr.add_argument("--prune_method", default="wanda", help="any installed pruner plugin")
    pr.add_argument("--use_variant", action="store_true", help="Wanda variant (per-row alpha search)")
    pr.add_argument("--save", help="folder for the results log")
    pr.add_argument("--save_model", help="folder to write the pruned model to (must not exist or be empty)")
    pr.add_argument("--save_format", default="hf",
                    help="format of --save_model: hf, compressed-tensors (vLLM / transformers) or bitmask-v1")
    pr.add_argument("--overwrite", action="store_true", help="allow --save_model to replace a non-empty folder")
    pr.add_argument("--quantizer", help="quantize after pruning, as `run` does: any installed quantizer plugin "
                    "(`wanda-pipeline plugins`), e.g. rtn; needed by --save_format compressed-tensors")
    pr.add_argument("--bits", type=int, help="quantizer bits, e.g. 4 or 8")
    pr.add_argument("--group_size", type=int, help="quantizer columns per scale, e.g. 128")
    pr.add_argument("--quantizer_option", action="append", default=[], metavar="KEY=VALUE",
                    help="any other option of the quantizer's config, e.g. symmetric=false (repeatable)")
    pr.add_argument("--calibration", default="c4", help="c4, wikitext2, self, or a .txt/.jsonl file")
    pr.add_argument("--calibration-path", dest="calibration_path", help="local file for a named source")
    pr.add_argument("--seqlen", type=int, help="calibration window; default min(2048, model max)")
    pr.add_argument("--eval-windows", dest="eval_windows", type=int, default=None,
                    help="evaluate only the first K WikiText-2 windows; 0 skips perplexity")
    pr.add_argument("--eval-seqlen", dest="eval_seqlen", type=int)
    pr.add_argument("--eval-path", dest="eval_path", help="local WikiText-2 test file")
    pr.add_argument("--dtype", default="float32")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--batch-size", dest="batch_size", type=_batch_size, default=1,
                    help="calibration sequences per block forward, or 'auto' (from free memory); 1 is reference-exact")
    pr.add_argument("--passes", type=int, choices=[1, 2], help="2 (default): reference-exact, two forwards per "
                    "block; 1: one forward of all calibration sequences per block, linears pruned as their input "
                    "arrives (faster, memory grows with the calibration set)")
    pr.add_argument("--threads", type=int, help="torch CPU threads while pruning (default: torch's)")
    pr.add_argument("--include", help="regex: prune only linears whose name (inside a block) matches")
    pr.add_argument("--exclude", help="regex: leave matching linears dense, e.g. 'mlp\\.down_proj'")
    pr.add_argument("--checkpoint_dir", help="checkpoint after every block here and resume from it after a "
                    "crash ('auto': a folder under the cache dir keyed by the run)")
    pr.add_argument("--no_resume", dest="resume", action="store_false",
                    help="ignore an existing checkpoint and start fresh")
    pr.add_argument("--keep_checkpoints", action="store_true", help="keep the checkpoint after a successful run")
    pr.add_argument("--stream", action="store_true", help="stream a safetensors model block by block from disk "
                    "(host memory does not grow with depth); needs a local or cached safetensors folder")
    pr.add_argument("--tracking-uri", dest="tracking_uri",
                    help="also track the run in MLflow (params, metrics, model), exactly as `run` does")
    pr.add_argument("--experiment", default="wanda-pipeline")
    pr.set_defaults(func=cmd_prune)
    return pr


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def prune_spec(args):
    """The PipelineSpec the flags describe; EngineSpec fields come from flags of the same name."""
    from wanda_pipeline.config import EngineSpec, PipelineSpec

    if args.stream and args.calibration == "self":
        raise ConfigError("--calibration self needs the whole model in memory; it cannot be combined with --stream")
    evaluators = [{"name": "sparsity"}]
    if args.eval_windows != 0:
        ev = {"name": "perplexity", "seqlen": args.eval_seqlen or args.seqlen, "windows": args.eval_windows,
              "path": args.eval_path}
        evaluators.insert(0, {k: v for k, v in ev.items() if v is not None or k == "name"})
    pruner = {"name": args.prune_method, "pattern": args.sparsity_type}
    if args.sparsity_ratio is not None:
        pruner["sparsity"] = args.sparsity_ratio
    if args.use_variant:
        pruner["use_variant"] = True
    engine = {k: getattr(args, k) for k in EngineSpec.model_fields if getattr(args, k, None) is not None}
    quantizer = _quantizer(args)
    try:
        return PipelineSpec(
            model={"source": args.model, "dtype": args.dtype},
            calibration={"source": args.calibration, "path": args.calibration_path, "nsamples": args.nsamples,
                         "seqlen": args.seqlen, "seed": args.seed},
            pruner=pruner, engine=engine, evaluators=evaluators, dense_baseline=False, quantizer=quantizer,
            register={"enabled": False}, tracking={"uri": args.tracking_uri, "experiment": args.experiment},
            save=({"path": args.save_model, "overwrite": args.overwrite, "format": args.save_format}
                  if args.save_model else None),
        )
    except Exception as exc:
        raise ConfigError(f"invalid flags: {exc}") from None


def _quantizer(args) -> dict | None:
    """The quantizer spec from the flags; the plugin's own Config validates the options in preflight."""
    import yaml

    options = {k: getattr(args, k) for k in ("bits", "group_size") if getattr(args, k, None) is not None}
    given = [f"--{k}" for k in options]  # the flags as the user typed them, for the message below
    for item in args.quantizer_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--quantizer_option {item!r}: expected KEY=VALUE, e.g. symmetric=false")
        options[key.strip()] = yaml.safe_load(value)
        given.append(f"--quantizer_option {key.strip()}")
    if args.quantizer is None:
        if options:
            raise ConfigError(f"{', '.join(given)} set without --quantizer; add e.g. --quantizer rtn")
        if args.save_model and args.save_format == "compressed-tensors":
            # A dense compressed-tensors folder is no smaller and no faster than hf: refuse rather than
            # hand a user who asked for the vLLM format a folder that is not quantized.
            raise ConfigError("--save_format compressed-tensors needs a quantizer: without one it would write "
                              "dense, unquantized weights. Add e.g. --quantizer rtn --bits 4 --group_size 128 "
                              "(int4 pack-quantized, what vLLM serves), or use --save_format hf for a dense folder")
        return None
    return {"name": args.quantizer, **options}


def announce(name: str, fn, *a, cache_key=None):
    """The prune CLI's stage runner: say which stage starts (the marker tests look for) and, on a
    CPU, about how long a long one will take."""
    from wanda_pipeline.estimate import before_stage

    print(f"[stage] {name}", file=sys.stderr, flush=True)
    before_stage(name, a)
    return fn(*a)


def cmd_prune(args) -> int:
    from wanda_pipeline.preflight import Output, spec_outputs
    from wanda_pipeline.run import execute

    spec = prune_spec(args)
    tracker = None
    if args.tracking_uri:
        from wanda_pipeline.tracking import MLflowTracker

        tracker = MLflowTracker(args.tracking_uri, args.experiment)
    outputs = spec_outputs(spec) + ([Output(args.save, "results-log folder", overwrite=True)] if args.save else [])
    result = execute(spec, pipeline=f"prune-{args.prune_method}", tracker=tracker, run_stage=announce,
                     outputs=outputs)
    m = result.metrics
    sparsity = m["sparsity_total"]
    print("*" * 30)
    print(f"sparsity sanity check {sparsity:.4f}")
    ppl = next((v for k, v in m.items() if k.startswith("ppl_") and not k.endswith("_vs_dense")), None)
    if ppl is not None:
        p = result.protocols.get("perplexity", {})
        print(f"wikitext perplexity {ppl:.4f}  ({p.get('windows')} windows x {p.get('seqlen')} tokens)")
    print("*" * 30)
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"log_{args.prune_method}.txt").open("w") as f:
            print("method\tactual_sparsity\tppl_test", file=f)
            print(f"{args.prune_method}\t{sparsity:.4f}\t{ppl if ppl is not None else 'nan'}", file=f)
    if result.saved:
        print(f"saved pruned model to {result.saved}")
    if result.mlflow_run_id:
        print(f"mlflow run {result.mlflow_run_id} ({result.tracking_uri})")
    return 0
