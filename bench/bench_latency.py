"""Latency of a 2:4-pruned LLaMA-7B-shaped model against its dense self, same device, same run.

Builds a LLaMA with random bf16 weights from a config (no download), times it dense with the
``latency`` evaluator, prunes it 2:4 by magnitude, and times it again; on CUDA the evaluator
also runs the qualifying linears as semi-structured sparse tensors (cuSPARSELt or CUTLASS)
and reports per-shape and end-to-end speedups. Writes bench/results/<tag>.json and .md.

    python bench/bench_latency.py --device cuda                  # full 7B shape (GPU, ~14 GB)
    python bench/bench_latency.py --device cpu --scale 8 --layers 2 --tag latency_cpu   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402

OUT = Path(__file__).parent / "results"
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=32, vocab_size=32000)


def build(scale: int, layers: int | None, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(LLAMA_7B)
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        shape[k] = shape[k] // scale
    if layers:
        shape["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, max_position_embeddings=4096), dtype=dtype)
    return model.eval(), shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=int, default=1, help="divide hidden/intermediate/heads by this (CPU: 8)")
    p.add_argument("--layers", type=int, help="default 32 (LLaMA-7B)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating dense / pruned rounds")
    p.add_argument("--tag", default="latency")
    p.add_argument("--note", default="", help="a line put at the top of the .md (e.g. why there is no GPU row)")
    args = p.parse_args(argv)

    from wanda_pipeline.engine import LayerEngine
    from wanda_pipeline.evaluators.latency import LatencyConfig, LatencyEvaluator
    from wanda_pipeline.pruners.magnitude import MagnitudeConfig, MagnitudePruner
    from wanda_pipeline.pruning import prune_model

    model, shape = build(args.scale, args.layers, getattr(torch, args.dtype), args.device)
    ev = LatencyEvaluator(LatencyConfig(device=args.device, prompt_tokens=args.prompt, decode_tokens=args.decode,
                                        warmup=1, repeats=args.repeats))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    dense_w = [m.weight.detach().clone() for m in linears]
    t0 = time.perf_counter()
    prune_model(model, None, MagnitudePruner(MagnitudeConfig(pattern="2:4")),
                LayerEngine(device=args.device, progress=False))
    prune_s = time.perf_counter() - t0
    pruned_w = [m.weight.detach().clone() for m in linears]
    # Alternate dense and pruned rounds so drift in machine load hits both alike; medians across rounds.
    runs: dict[str, list] = {"dense": [], "pruned": []}
    for _ in range(args.rounds):
        for label, weights in (("dense", dense_w), ("pruned", pruned_w)):
            with torch.no_grad():
                for m, w in zip(linears, weights, strict=True):
                    m.weight.copy_(w)
            runs[label].append(ev.evaluate(model, None))
    dense, pruned = (_median_result(runs[k]) for k in ("dense", "pruned"))
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(), "load_average_1m_after": os.getloadavg()[0], "rounds": args.rounds,
        "note": args.note, "shape": shape, "dtype": args.dtype, "prune_seconds": prune_s,
        "dense": dense.metrics, "pruned_2_4": pruned.metrics, "protocol": pruned.protocol,
        "per_shape": pruned.tables.get("latency_per_shape", []),
        "ratios_vs_dense": {k: pruned.metrics[k] / v for k, v in dense.metrics.items() if k in pruned.metrics},
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    (OUT / f"{args.tag}.md").write_text(render(result))
    print(render(result))
    return 0


def _median_result(results: list):
    """The round with the median prefill time (its metrics, protocol and tables stay together)."""
    ordered = sorted(results, key=lambda r: r.metrics["latency_prefill_ms"])
    return ordered[len(ordered) // 2]


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Latency: 2:4-pruned vs dense ({r['dtype']}, {r['shape']['num_hidden_layers']} layers, "
             f"hidden {r['shape']['hidden_size']}, intermediate {r['shape']['intermediate_size']})", "",
             *([r["note"], ""] if r.get("note") else []),
             f"Machine: {m['cpu']} ({m['cores']} cores), GPU {m['gpu']}, torch {m['torch']}, "
             f"transformers {m['transformers']}; 1-minute load average {r['load_average_1m_after']:.1f} "
             f"after the run; median of {r['rounds']} alternating rounds.", f"Command: `{r['command']}`", "",
             f"Sparse kernel: **{r['protocol']['sparse_kernel']}** ({r['protocol']['sparse_kernel_reason']}).", "",
             "| metric | dense | 2:4 pruned (dense kernels) | pruned / dense |", "|---|---|---|---|"]
    for k, v in r["dense"].items():
        lines.append(f"| {k} | {v:.3f} | {r['pruned_2_4'][k]:.3f} | {r['ratios_vs_dense'][k]:.3f} |")
    sparse = {k: v for k, v in r["pruned_2_4"].items() if k.startswith("latency_sparse")}
    if sparse:
        lines += ["", "| 2:4 sparse kernels, end to end | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sparse.items()]
    if r["per_shape"]:
        lines += ["", "| linear shape | tokens | dense ms | sparse ms | speedup | kernel |", "|---|" * 6]
        lines += [f"| {s['shape']} | {s['tokens']} | {s['dense_ms']:.4f} | {s['sparse_ms']:.4f} | {s['speedup']:.2f} "
                  f"| {s['kernel']} |" for s in r["per_shape"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
