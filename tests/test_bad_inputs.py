"""The bad-input table (docs/failures.md): each case through the real CLI entry point, asserting
the exit code, a message that names the problem and the fix, that no stage ran (no model was
loaded), and that nothing was left behind (no output folder, no partial folder, no RUNNING
MLflow run, no registered version)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import free_port, needs_data
from wanda_pipeline.cli import main

pytestmark = needs_data


def pipelines(tmp: Path, model: str, **over) -> Path:
    spec = {"model": {"source": model},
            "calibration": {"source": "c4", "nsamples": 2, "seqlen": 64},
            "pruner": {"name": "wanda", "sparsity": 0.5},
            "evaluators": [{"name": "perplexity", "seqlen": 64, "windows": 2}, {"name": "sparsity"}],
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bad"}}
    spec.update(over)
    path = tmp / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"p": spec}}))
    return path


def prune(model, *extra):
    return ["prune", "--model", str(model), "--nsamples", "2", "--seqlen", "64", "--eval-windows", "2", *extra]


def corrupt_copy(tiny: Path, tmp: Path, how: str) -> Path:
    bad = tmp / f"model-{how}"
    shutil.copytree(tiny, bad)
    if how == "truncated":
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "no-config":
        (bad / "config.json").unlink()
    elif how == "bad-config":
        (bad / "config.json").write_text("{not json")
    elif how == "no-weights":
        (bad / "model.safetensors").unlink()
    return bad


# (id, build(tmp, tiny) -> argv, env overrides, exit code, fragments: the problem and the fix)
CASES = [
    ("nm-with-sparsity", lambda t, m: prune(m, "--sparsity_type", "2:4", "--sparsity_ratio", "0.7"), {}, 2,
     ["prunes exactly 2/4", "remove `sparsity`"]),
    ("sparsity-one", lambda t, m: prune(m, "--sparsity_ratio", "1.0"), {}, 2, ["must be in [0, 1)"]),
    ("unknown-pruner", lambda t, m: prune(m, "--prune_method", "wandaa"), {}, 3, ["unknown pruner 'wandaa'",
                                                                                   "available"]),
    ("seqlen-above-model-max", lambda t, m: prune(m, "--seqlen", "100000"), {}, 2,
     ["calibration.seqlen=100000 exceeds the model's maximum of 256", "use at most 256"]),
    ("eval-seqlen-above-max", lambda t, m: prune(m, "--eval-seqlen", "4096"), {}, 2, ["seqlen=4096 exceeds"]),
    ("cuda-without-gpu", lambda t, m: prune(m, "--device", "cuda"), {}, 7, ["no usable CUDA", "use device 'cpu'"]),
    ("not-a-device", lambda t, m: prune(m, "--device", "gpu0"), {}, 7, ["is not a device", "'cuda:N'"]),
    ("missing-calibration-file", lambda t, m: prune(m, "--calibration", str(t / "none.jsonl")), {}, 4,
     ["none.jsonl does not exist", "fix the path"]),
    ("empty-calibration-file", lambda t, m: prune(m, "--calibration", _write(t / "e.jsonl", "\n")), {}, 4,
     ["has no text"]),
    ("corrupt-calibration-jsonl", lambda t, m: prune(m, "--calibration", _write(t / "c.jsonl", "{oops\n")), {}, 4,
     ["is not valid JSON"]),
    ("calibration-offline-no-data", lambda t, m: prune(m), {"WANDA_DATA_DIR": None}, 4,
     ["HF_DATASETS_OFFLINE=1", "set $WANDA_DATA_DIR"]),
    ("missing-eval-file", lambda t, m: prune(m, "--eval-path", str(t / "none.txt")), {}, 4,
     ["none.txt", "missing or empty", "fix its `path`"]),
    ("missing-model-folder", lambda t, m: prune(t / "no-model"), {}, 4, ["does not exist", "check the path"]),
    ("model-without-config", lambda t, m: prune(corrupt_copy(m, t, "no-config")), {}, 4, ["has no config.json"]),
    ("model-config-not-json", lambda t, m: prune(corrupt_copy(m, t, "bad-config")), {}, 4, ["not readable JSON"]),
    ("truncated-safetensors", lambda t, m: prune(corrupt_copy(m, t, "truncated")), {}, 4,
     ["is corrupt", "truncated", "re-download"]),
    ("model-without-weights", lambda t, m: prune(corrupt_copy(m, t, "no-weights")), {}, 4, ["has no weights"]),
    ("not-a-gguf", lambda t, m: prune(_write(t / "m.gguf", "hello")), {}, 4, ["not a GGUF file"]),
    ("offline-hub-id", lambda t, m: prune("nobody/no-such-model-xyz"), {"HF_HUB_OFFLINE": "1"}, 4,
     ["HF_HUB_OFFLINE=1", "not in the local cache", "local folder"]),
    ("save-over-model-source", lambda t, m: prune(m, "--save_model", str(m)), {}, 7,
     ["overlaps) the model source", "another folder"]),
    ("save-into-existing-folder", lambda t, m: prune(m, "--save_model", _folder(t / "keep")), {}, 7,
     ["exists and is not empty", "--overwrite"]),
    ("save-path-is-a-file", lambda t, m: prune(m, "--save_model", _write(t / "afile", "x")), {}, 7, ["is a file"]),
    ("save-unwritable", lambda t, m: prune(m, "--save_model", "/proc/wanda-out"), {}, 7, ["cannot be written"]),
    ("tracking-server-down", lambda t, m: prune(m, "--tracking-uri", f"http://127.0.0.1:{free_port()}"), {}, 6,
     ["unreachable", "mlflow server"]),
    ("tracking-store-read-only", lambda t, m: prune(m, "--tracking-uri", "sqlite:////proc/wanda.db"), {}, 6,
     ["read-only", "writable sqlite"]),
    ("invalid-alias", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m))), "--set",
                                    "register.alias=bad alias!"], {}, 2, ["alias 'bad alias!' is not valid"]),
    ("reserved-alias", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m))), "--set",
                                     "register.alias=latest"], {}, 2, ["reserved"]),
    ("misspelt-plugin-option", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m))), "--set",
                                             "pruner.sparsty=0.5"], {}, 2,
     ["sparsty: unknown option", "check the spelling"]),
    ("run-cuda-without-gpu", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m), engine={"device": "cuda"}))],
     {}, 7, ["no usable CUDA"]),
    ("run-save-over-source", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m), save=str(m)))], {}, 7,
     ["overlaps) the model source"]),
    ("duplicate-pipeline-name", lambda t, m: ["validate", _write(t / "dup.yaml", DUPLICATE)], {}, 2,
     ["duplicate key 'p'", "Rename or remove one"]),
    ("nm-with-sparsity-in-file", lambda t, m: ["validate", str(pipelines(t, str(m), pruner={
        "name": "wanda", "pattern": "2:4", "sparsity": 0.7}))], {}, 2, ["prunes exactly 2/4"]),
    ("sweep-sparsity-out-of-range", lambda t, m: ["validate", _write(t / "s.yaml", SWEEP)], {}, 2,
     ["sweeps.s.sparsities.1.pruner.sparsity", "[0, 1)"]),
    ("validate-seqlen-above-max", lambda t, m: ["validate", str(pipelines(t, str(m), calibration={
        "source": "c4", "seqlen": 100000}))], {}, 2, ["pipelines.p:", "calibration.seqlen=100000 exceeds"]),
    ("validate-deep-missing-data", lambda t, m: ["validate", "--deep", str(pipelines(t, str(m), calibration={
        "source": str(t / "none.jsonl")}))], {}, 4, ["none.jsonl does not exist"]),
    ("sweep-points-save-to-one-folder", lambda t, m: ["sweep", "s", "-f", _write(t / "ss.yaml", SWEEP_SAVE.replace(
        "MODEL", str(m)))], {}, 2, ["same folder", "remove `save`"]),
    ("zeroshot-data-missing", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m), evaluators=[
        {"name": "zeroshot", "data_dir": str(t / "nodata")}]))], {}, 4, ["no local data for tasks", "data_dir"]),
    ("many-problems-at-once", lambda t, m: prune(t / "no-model", "--device", "cuda", "--sparsity_type", "2:4",
                                                 "--sparsity_ratio", "0.6"), {}, 2,
     ["3 problem(s)", "prunes exactly", "does not exist", "no usable CUDA"]),
]

DUPLICATE = """pipelines:
  p: {model: {source: smollm2-135m}, pruner: {name: wanda}}
  p: {model: {source: smollm2-135m}, pruner: {name: magnitude}}
"""
SWEEP = """pipelines:
  p: {model: {source: smollm2-135m}, pruner: {name: wanda}}
sweeps:
  s: {pipeline: p, sparsities: [0.5, 1.5]}
"""
SWEEP_SAVE = """pipelines:
  p: {model: {source: MODEL}, pruner: {name: wanda}, save: prune-out}
sweeps:
  s: {pipeline: p, sparsities: [0.3, 0.5]}
"""


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _folder(path: Path) -> str:
    path.mkdir()
    (path / "precious.txt").write_text("the user's file")
    return str(path)


def leftovers(tmp: Path) -> list[str]:
    return [str(p) for p in tmp.rglob("*") if ".partial-" in p.name or p.name == "prune-out"]


def tracking_state(db: Path) -> tuple[list[str], list[str]]:
    if not db.exists():
        return [], []
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    running = [r.info.run_id for r in client.search_runs(exps) if r.info.status == "RUNNING"] if exps else []
    return running, [m.name for m in client.search_registered_models()]


@pytest.mark.parametrize("case,build,env,code,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, build, env, code, fragments, tmp_path, tiny_dir, monkeypatch, capsys):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path, tiny_dir)
    before = json.dumps(sorted(p.name for p in Path(tiny_dir).iterdir()))
    assert main(argv) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "[stage] load" not in err and "Task run 'load" not in err  # no model was loaded
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []
    assert json.dumps(sorted(p.name for p in Path(tiny_dir).iterdir())) == before  # the source is untouched
    running, registered = tracking_state(tmp_path / "mlflow.db")
    assert running == [] and registered == []
    if case == "save-into-existing-folder":
        assert (tmp_path / "keep" / "precious.txt").read_text() == "the user's file"


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25


def test_unexpected_exception_is_one_line_with_exit_1(monkeypatch, capsys, tmp_path):
    from wanda_pipeline import cli

    def boom(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    assert main(["validate", str(tmp_path / "x.yaml")]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something nobody expected" in err and "Traceback" not in err
    assert "--debug" in err
    assert main(["--debug", "validate", str(tmp_path / "x.yaml")]) == 1
    assert "Traceback" in capsys.readouterr().err
