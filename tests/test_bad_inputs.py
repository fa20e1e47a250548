"""The bad-input table (docs/failures.md): each case through the real CLI entry point, asserting
the exit code, a message that names the problem and the fix, that no stage ran (no model was
loaded), and that nothing was left behind (no output folder, no partial folder, no RUNNING
MLflow run, no registered version)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.bad_input_files import checkpoint, corrupt_copy, gguf_file, write
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
    # silently nothing, or the wrong thing (issue 20)
    ("sweep-without-points", lambda t, m: ["validate", _write(t / "s.yaml", SWEEP_EMPTY)], {}, 2,
     ["sweeps.s: has no points", "`sparsities` is empty", "give e.g. sparsities"]),
    ("sweep-run-without-points", lambda t, m: ["sweep", "s", "-f", _write(t / "s.yaml", SWEEP_EMPTY)], {}, 2,
     ["sweeps.s: has no points"]),
    ("sweep-same-point-twice", lambda t, m: ["validate", _write(t / "s.yaml", SWEEP.replace("1.5", "0.5"))], {}, 2,
     ["the same point twice (0.5)", "list each sparsity and pipeline once"]),
    ("sweep-points-not-distinct", lambda t, m: ["sweep", "s", "-f", _write(t / "s.yaml", SWEEP_TINY.replace(
        "MODEL", str(m)))], {}, 2, ["p-s0.333333", "not distinct", "to 6 digits"]),
    ("include-matches-nothing", lambda t, m: prune(m, "--include", "nosuchlinear"), {}, 2,
     ["--include) 'nosuchlinear' matches 0 of the 7 linears", "self_attn.q_proj", "nothing would be pruned"]),
    ("exclude-matches-everything", lambda t, m: prune(m, "--exclude", ".*"), {}, 2,
     ["--exclude) '.*' excludes all 7 linears", "mlp.down_proj", "nothing would be pruned"]),
    ("include-then-exclude-leave-nothing", lambda t, m: prune(m, "--include", "mlp", "--exclude", "proj"), {}, 2,
     ["excludes all 3 linears that include matches", "mlp.gate_proj"]),
    ("include-not-a-regex", lambda t, m: prune(m, "--include", "mlp.("), {}, 2, ["'mlp.(' is not a valid regex"]),
    ("validate-exclude-everything", lambda t, m: ["validate", str(pipelines(t, str(m), engine={"exclude": "."}))],
     {}, 2, ["pipelines.p:", "excludes all 7 linears"]),
    ("per-layer-ratio-beyond-blocks", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m), allocation={
        "method": "per_layer", "ratios": {5: 0.5}}))], {}, 2, ["names blocks [5]", "blocks 0..1"]),
    ("sparsity-zero-saved", lambda t, m: prune(m, "--sparsity_ratio", "0", "--save_model", str(t / "prune-out")),
     {}, 2, ["sparsity is 0: nothing would be pruned", "saved to", "e.g. 0.5"]),
    ("sparsity-zero-registered", lambda t, m: ["run", "p", "-f", str(pipelines(t, str(m))), "--set",
                                               "pruner.sparsity=0"], {}, 2,
     ["would be registered as if pruned", "register.enabled: false"]),
    ("config-more-layers-than-weights", lambda t, m: prune(corrupt_copy(m, t, "more-layers")), {}, 4,
     ["config.json: 3 decoder blocks, the weights: 2", "model.layers.2.", "initialise them randomly"]),
    ("weights-with-extra-layers", lambda t, m: prune(corrupt_copy(m, t, "fewer-layers")), {}, 4,
     ["config.json: 1 decoder blocks, the weights: 2", "model.layers.1.", "would drop them"]),
    ("weights-of-another-shape", lambda t, m: prune(corrupt_copy(m, t, "other-shape")), {}, 4,
     ["have another shape", "mlp.up_proj.weight is 64x32 in the weights, 80x32 in config.json"]),
    ("validate-deep-weights-mismatch", lambda t, m: ["validate", "--deep", str(pipelines(
        t, str(corrupt_copy(m, t, "more-layers"))))], {}, 4, ["its weights do not match its config.json"]),
    ("index-names-missing-shard", lambda t, m: prune(corrupt_copy(m, t, "index-missing-shard")), {}, 4,
     ["model.safetensors.index.json names 1 shard(s)", "model-00002-of-00002.safetensors"]),
    ("tokenizer-json-corrupt", lambda t, m: prune(corrupt_copy(m, t, "bad-tokenizer")), {}, 4,
     ["tokenizer file", "tokenizer.json is not readable JSON"]),
    ("no-tokenizer-files", lambda t, m: prune(corrupt_copy(m, t, "no-tokenizer")), {}, 4,
     ["has no tokenizer files", "save_pretrained"]),
    ("gguf-block-count-mismatch", lambda t, m: prune(gguf_file(t, "block-count")), {}, 4,
     ["llama.block_count=3", "tensors hold 2 blocks"]),
    ("stream-a-gguf", lambda t, m: prune(gguf_file(t, "ok"), "--stream"), {}, 2,
     ["--stream) reads safetensors shards", "has none; drop --stream"]),
    ("gguf-truncated", lambda t, m: prune(gguf_file(t, "truncated")), {}, 4, ["is corrupt or truncated"]),
    ("gguf-unknown-architecture", lambda t, m: prune(gguf_file(t, "unknown-arch")), {}, 4,
     ["architecture 'nosucharch'", "convert the model to a safetensors folder"]),
    ("gguf-without-tokenizer", lambda t, m: prune(gguf_file(t, "no-tokenizer")), {}, 4,
     ["has no tokenizer (no tokenizer.ggml.tokens"]),
    ("calibration-text-not-a-string", lambda t, m: prune(m, "--calibration", write(
        t / "n.jsonl", '{"text": "ok"}\n{"text": 5}\n')), {}, 4, ["n.jsonl: 1 bad line(s)", 'line 2: "text" is int']),
    ("calibration-several-bad-lines", lambda t, m: prune(m, "--calibration", write(
        t / "b.jsonl", '{"text": "ok"}\n{oops\n\n{"txt": "x"}\n[1]\n')), {}, 4,
     ["3 bad line(s)", "line 2: is not valid JSON", 'line 4: has no "text" field', "line 5:"]),
    ("calibration-not-utf8", lambda t, m: prune(m, "--calibration", write(t / "l.txt", b"caf\xe9 " * 50)), {}, 4,
     ["l.txt", "is not UTF-8", "convert it to UTF-8"]),
    ("calibration-jsonl-not-utf8", lambda t, m: prune(m, "--calibration", write(
        t / "u.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')), {}, 4, ["line 2: not UTF-8"]),
    ("calibration-unsupported-format", lambda t, m: prune(m, "--calibration", write(t / "d.csv", "a,b\n")), {}, 2,
     ["unsupported data file d.csv", ".jsonl"]),
    ("calibration-too-short-for-seqlen", lambda t, m: prune(m, "--calibration", write(
        t / "s.jsonl", '{"text": "a short document"}\n' * 20)), {}, 4,
     ["no calibration document", "longer than seqlen=64 tokens", "the longest: ", "Lower calibration.seqlen"]),
    ("eval-file-bad-record", lambda t, m: prune(m, "--eval-path", write(t / "e.jsonl", '{"text": null}\n')), {}, 4,
     ["evaluator 'perplexity' file", '"text" is NoneType']),
    ("checkpoint-manifest-corrupt", lambda t, m: prune(m, "--checkpoint_dir", checkpoint(t, "corrupt-manifest")),
     {}, 4, ["manifest.json is corrupt", "not readable JSON", "--no_resume"]),
    ("checkpoint-block-missing", lambda t, m: prune(m, "--checkpoint_dir", checkpoint(t, "missing-block")), {}, 4,
     ["block-00000.safetensors, which it counts as written", "--no_resume"]),
    ("checkpoint-dir-not-a-checkpoint", lambda t, m: prune(m, "--checkpoint_dir", checkpoint(
        t, "not-a-checkpoint")), {}, 7, ["holds no checkpoint", "--checkpoint_dir"]),
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
SWEEP_EMPTY = """pipelines:
  p: {model: {source: smollm2-135m}, pruner: {name: wanda}}
sweeps:
  s: {pipeline: p, sparsities: []}
"""
SWEEP_TINY = """pipelines:
  p: {model: {source: MODEL}, pruner: {name: wanda}, calibration: {nsamples: 2, seqlen: 64},
      evaluators: [{name: sparsity}], register: {enabled: false}}
sweeps:
  s: {pipeline: p, sparsities: [0.3333331, 0.3333332]}
"""
SWEEP_SAVE = """pipelines:
  p: {model: {source: MODEL}, pruner: {name: wanda}, save: prune-out}
sweeps:
  s: {pipeline: p, sparsities: [0.3, 0.5]}
"""


def _write(path: Path, text: str) -> str:
    return write(path, text)


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


def test_table_has_at_least_60_cases():
    assert len(CASES) >= 60


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


def test_sparsity_zero_only_measures_the_dense_model(tmp_path, tiny_dir, monkeypatch, capsys):
    """Sparsity 0 is allowed as a measurement of the dense model (the benches' dense row);
    only saving or registering it as a pruned model is refused (rows sparsity-zero-*)."""
    monkeypatch.chdir(tmp_path)
    assert main(prune(tiny_dir, "--sparsity_ratio", "0")) == 0
    out = capsys.readouterr().out
    assert "sparsity sanity check 0.0000" in out and "saved pruned model" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_resume_may_start_over_in_a_checkpoint_folder(tmp_path, tiny_dir):
    """Preflight lets --no_resume replace a folder that holds a checkpoint (the engine starts over
    there); a folder holding anything else stays refused."""
    from wanda_pipeline.config import PipelineSpec
    from wanda_pipeline.preflight import check_outputs, spec_outputs
    from wanda_pipeline.sourcecheck import SourceFacts

    ours, theirs = Path(checkpoint(tmp_path, "missing-block")), Path(checkpoint(tmp_path, "not-a-checkpoint"))
    for folder, refused in ((ours, False), (theirs, True)):
        spec = PipelineSpec(model={"source": str(tiny_dir)}, pruner={"name": "wanda"},
                            engine={"checkpoint_dir": str(folder), "resume": False})
        problems = [str(p) for p in check_outputs(spec_outputs(spec), SourceFacts())]
        assert bool(problems) == refused, problems
