"""A 3-point sweep on the demo model: ``--workers 1`` (one process, points in turn) against
``--workers 2`` (a local Prefect server, a process work pool and two workers).

Measures the wall time of each whole command (server start included) and, from the MLflow
runs of the points, how long the points overlapped. Writes bench/results/sweep.{json,md}.

    python bench/bench_sweep.py [--nsamples 8 --seqlen 128 --windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "results"


def pipelines(args, folder: Path) -> Path:
    doc = {
        "defaults": {
            "model": {"source": "smollm2-135m"},
            "calibration": {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen},
            "evaluators": [{"name": "perplexity", "seqlen": args.seqlen, "windows": args.windows},
                           {"name": "sparsity"}],
            "register": {"enabled": False},
        },
        "pipelines": {"demo": {"pruner": {"name": "wanda", "sparsity": 0.5}}},
        "sweeps": {"bench": {"pipeline": "demo", "sparsities": [0.3, 0.5, 0.7]}},
    }
    path = folder / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def spans(uri: str, experiment: str) -> list[tuple[float, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return sorted((r.info.start_time / 1000, r.info.end_time / 1000) for r in runs
                  if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED")


def overlap_seconds(sp: list[tuple[float, float]]) -> float:
    """Time during which at least two points were inside their MLflow runs."""
    events = sorted([(s, 1) for s, _ in sp] + [(e, -1) for _, e in sp])
    depth, last, total = 0, None, 0.0
    for t, d in events:
        if depth >= 2 and last is not None:
            total += t - last
        depth += d
        last = t
    return total


def run(workers: int, path: Path, folder: Path) -> dict:
    uri = f"sqlite:///{folder / f'mlflow-w{workers}.db'}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(MLFLOW_TRACKING_URI=uri, PREFECT_HOME=str(folder / f"prefect-w{workers}"), TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "wanda_pipeline.cli", "sweep", "bench", "-f", str(path), "--workers", str(workers)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"--workers {workers} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    sp = spans(uri, "wanda-pipeline")
    return {"workers": workers, "wall_s": wall, "points": len(sp), "point_s": [e - s for s, e in sp],
            "points_span_s": max(e for _, e in sp) - min(s for s, _ in sp), "overlap_s": overlap_seconds(sp),
            "command": "wanda-pipeline " + " ".join(cmd[3:5] + cmd[7:])}


def versions() -> dict:
    import mlflow
    import prefect
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "prefect": prefect.__version__, "mlflow": mlflow.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
               "gpu": "none: no GPU was lent to this session"}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        folder = Path(tmp)
        path = pipelines(args, folder)
        results = [run(1, path, folder), run(2, path, folder)]
    machine["load_avg_at_end"] = os.getloadavg()
    one, two = results
    report = {"machine": machine, "versions": versions(), "settings": vars(args), "results": results,
              "wall_ratio_w2_over_w1": two["wall_s"] / one["wall_s"],
              "command": f"python bench/bench_sweep.py --nsamples {args.nsamples} --seqlen {args.seqlen} "
                         f"--windows {args.windows}"}
    OUT.mkdir(exist_ok=True)
    (OUT / "sweep.json").write_text(json.dumps(report, indent=2))
    (OUT / "sweep.md").write_text(render(report))
    print(render(report))


def render(r: dict) -> str:
    rows = "\n".join(
        f"| {x['workers']} | {x['wall_s']:.0f} | {x['points_span_s']:.0f} | "
        f"{sum(x['point_s']) / len(x['point_s']):.0f} | {x['overlap_s']:.0f} | `{x['command']}` |"
        for x in r["results"])
    m, v = r["machine"], r["versions"]
    ratio = r["wall_ratio_w2_over_w1"]
    verdict = (f"On this machine the pool gained nothing (it took {ratio - 1:.0%} longer)." if ratio >= 1 else
               f"On this machine the gain is small: {1 - ratio:.0%} less wall time." if ratio > 0.8 else
               f"On this machine the pool saved {1 - ratio:.0%} of the wall time.")
    return f"""# Sweep on a work pool: --workers 1 vs --workers 2

SmolLM2-135M (demo model, float32, CPU), Wanda at sparsity 0.3 / 0.5 / 0.7: 3 points, calibration
{r['settings']['nsamples']} x {r['settings']['seqlen']} C4 tokens, perplexity on {r['settings']['windows']}
WikiText-2 windows of {r['settings']['seqlen']}, registration off. Both commands in the same run of
this script; each wall time includes starting its Prefect server.

| workers | wall (s) | first point start to last end (s) | mean point (s) | points overlapping (s) | command |
|---|---|---|---|---|---|
{rows}

**Wall-time ratio, workers 2 / workers 1: {r['wall_ratio_w2_over_w1']:.2f}** (below 1 means the pool was faster).

`--workers 1` runs the points one after another in one process (models and libraries loaded once,
no overlap). `--workers 2` starts a `prefect server`, a process work pool and two workers; each
point is a fresh flow-run process that imports torch, transformers, Prefect and MLflow and loads
the model itself, and measures its own dense baseline (the one-process sweep measures it once),
while the two workers share the same 2 CPU cores. {verdict} The points do overlap, but two
CPU-bound points on 2 cores take about as long as one after the other, and each pays a process
start. The pool pays off where each point has its own GPU and runs for minutes to hours.

No GPU was lent to this session, so there is no GPU measurement.

- Machine: {m['platform']}, {m['cpus']} CPUs, load average {', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}
  at start and {', '.join(f'{x:.1f}' for x in m['load_avg_at_end'])} at the end (the machine is shared,
  so absolute times are noisy; the ratio is measured in one run).
- GPU: {m['gpu']}
- Versions: {', '.join(f'{k} {x}' for k, x in v.items())}
- Command: `{r['command']}`
"""


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:  # re-write sweep.md from sweep.json
        (OUT / "sweep.md").write_text(render(json.loads((OUT / "sweep.json").read_text())))
    else:
        main()
