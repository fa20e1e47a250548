"""Streaming benchmark: peak host memory of `wanda-pipeline prune --stream` against model size.

Builds a synthetic 12-layer LLaMA (hidden 2048, float32, random weights, about 3.2 GB in
sharded safetensors, written one block at a time) in a temp folder, then runs the whole
`prune` command (calibrate, prune, evaluate perplexity, save) in a child process and reads
the child's peak RSS (ru_maxrss from wait4). Optionally the in-memory path runs too, as the
baseline in the same run. Writes bench/results/streaming.{json,md}.

    python bench/bench_streaming.py                 # streaming only (~10 min on 2 busy cores)
    python bench/bench_streaming.py --baseline      # also the in-memory path
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402

OUT = Path(__file__).parent / "results"
LAYERS, HIDDEN, INTER, HEADS = 12, 2048, 5504, 16


def build_model(folder: Path) -> int:
    """Write the synthetic model shard by shard (never whole in memory); returns its bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from wanda_pipeline.models import demo_model_dir

    tok = AutoTokenizer.from_pretrained(demo_model_dir("smollm2-135m"))
    cfg = AutoConfig.for_model("llama", hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=len(tok),
                               max_position_embeddings=2048, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in skeleton.state_dict().items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):02d}" if parts[:2] == ["model", "layers"] else "outer"
        groups.setdefault(key, {})[name] = p.shape
    weight_map, total = {}, 0
    for key, shapes in sorted(groups.items()):
        tensors = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02)
                   for n, s in shapes.items()}
        fname = f"model-{key}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return total


def run_child(cmd: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    ppl = next((float(line.split()[2]) for line in out.splitlines() if line.startswith("wikitext perplexity")), None)
    stages = next((line for line in out.splitlines() if line.startswith("stage seconds")), "")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_seconds": round(time.time() - t0, 1),
            "perplexity": ppl, "stages": stages}


def main() -> None:
    global LAYERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--baseline", action="store_true", help="also run the in-memory path")
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer for a quick look")
    ap.add_argument("--workdir", help="where to build the model (default: a temp folder)")
    args = ap.parse_args()
    LAYERS = args.layers

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-stream-"))
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    size = build_model(model_dir)
    build_s = time.time() - t0
    exe = str(Path(sys.executable).parent / "wanda-pipeline")
    base = [exe, "prune", "--model", str(model_dir), "--calibration", "c4", "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--eval-windows", str(args.eval_windows), "--eval-seqlen",
            str(args.seqlen)]
    runs: dict[str, dict] = {}
    try:
        cmd = [*base, "--stream", "--save_model", str(work / "out-stream")]
        runs["stream"] = {"command": " ".join(cmd), **run_child(cmd)}
        write(args, size, build_s, runs)  # a result even if the baseline is stopped
        if args.baseline:
            cmd = [*base, "--save_model", str(work / "out-memory")]
            runs["in_memory"] = {"command": " ".join(cmd), **run_child(cmd)}
            write(args, size, build_s, runs)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def write(args, size: int, build_s: float, runs: dict) -> None:
    for r in runs.values():
        r["peak_rss_over_model"] = round(r["peak_rss_bytes"] / size, 3)
    result = {"machine": machine(), "model": {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTER,
                                              "dtype": "float32", "bytes": size, "build_seconds": round(build_s, 1)},
              "calibration": f"c4 {args.nsamples} x {args.seqlen}", "eval": f"{args.eval_windows} x {args.seqlen}",
              "runs": runs, "gpu_note": "no GPU was lent to this session; CUDA peak_device_bytes not measured",
              "bench_command": " ".join([Path(sys.executable).name, *sys.argv])}
    OUT.mkdir(exist_ok=True)
    (OUT / "streaming.json").write_text(json.dumps(result, indent=2))
    lines = ["# Streaming: peak host memory of `prune --stream`", "",
             f"Synthetic LLaMA, {LAYERS} layers, hidden {HIDDEN}, float32: **{size / 2**30:.2f} GiB** in sharded "
             f"safetensors. Calibration {result['calibration']}, perplexity {result['eval']} (WikiText-2), save.", "",
             "| path | peak RSS (GiB) | peak RSS / model size | wall (s) | perplexity |", "|---|---|---|---|---|"]
    for label, r in runs.items():
        lines.append(f"| {label} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['peak_rss_over_model']:.2f} | "
                     f"{r['wall_seconds']} | {r['perplexity']} |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; "
              f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
              f"GPU: {result['gpu_note']}.", "", f"Command: `{result['bench_command']}`", ""]
    for label, r in runs.items():
        lines += [f"- {label}: `{r['command']}`", f"  - {r['stages']}"]
    (OUT / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
