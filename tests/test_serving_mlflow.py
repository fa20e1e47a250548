"""Registered models in the stock MLflow clients: a signature with generation params and an input
example; transformers checkpoints in MLflow's transformers flavour, loadable and servable in an
environment where `wanda_pipeline` cannot be imported; `mlflow models serve` honours params."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from safetensors.torch import load_file

from tests.conftest import free_port, wait_http
from wanda_pipeline.cli import main
from wanda_pipeline.mlflow_model import load_folder
from wanda_pipeline.models import state_digest

# The contract, written out here rather than imported: what a client may send, with defaults.
PARAMS = {"max_new_tokens": ("long", 32), "do_sample": ("boolean", False), "temperature": ("double", 1.0),
          "top_p": ("double", 1.0), "top_k": ("long", 50), "repetition_penalty": ("double", 1.0)}
# format -> (how the folder is made by `prune`, the flavour MLflow records)
FORMATS = {
    "hf": ([], "transformers"),
    "ct-int4": (["--save_format", "compressed-tensors", "--quantizer", "rtn", "--bits", "4", "--group_size", "16"],
                "transformers"),
    "ct-int4-asym": (["--save_format", "compressed-tensors", "--quantizer", "rtn", "--bits", "4", "--group_size",
                      "16", "--quantizer_option", "symmetric=false"], "python_function"),
    "bitmask": (["--save_format", "bitmask-v1"], "python_function"),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_dir):
    """Each format pruned by `prune`, logged by the tracker and registered as NAME@champion."""
    import mlflow

    from wanda_pipeline.tracking import MLflowTracker

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "serving")
    folders = {}
    for name, (flags, _) in FORMATS.items():
        folders[name] = root / name
        assert main(["prune", "--model", str(tiny_dir), "--prune_method", "magnitude", "--eval-windows", "0",
                     "--save_model", str(folders[name]), *flags]) == 0
        with tracker.run(name):
            model_uri = tracker.log_model(folders[name], {"format": name})
        version = mlflow.register_model(model_uri, f"tiny-{name}").version
        tracker.client.set_registered_model_alias(f"tiny-{name}", "champion", version)
    return uri, folders, tracker


def _download(uri: str, name: str, dst: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/tiny-{name}@champion", dst_path=str(dst)))


@pytest.mark.parametrize("name", list(FORMATS))
def test_registered_model_has_signature_example_and_the_right_flavour(registry, name, tmp_path, smollm2_tokenizer):
    import mlflow.pyfunc
    from mlflow.models import Model

    uri, folders, tracker = registry
    local = _download(uri, name, tmp_path)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavour = FORMATS[name][1]
    assert ("transformers" in mlmodel["flavors"]) is (flavour == "transformers")
    loader = mlmodel["flavors"]["python_function"]["loader_module"]
    assert loader == ("mlflow.transformers" if flavour == "transformers" else "wanda_pipeline.mlflow_model")
    reqs = (local / "requirements.txt").read_text()
    assert ("wanda-pipeline" in reqs) is (flavour == "python_function") and "transformers==" in reqs

    model = Model.load(str(local))
    params = {p.name: (p.dtype.name, p.default) for p in model.signature.params.params}
    assert params == PARAMS
    assert [c.type.name for c in model.signature.inputs.inputs] == ["string"]
    assert model.load_input_example(str(local)) is not None and model.load_input_example_params(str(local))

    # the tracker's loader reads every flavour back to the very weights of the exported folder
    same, tok = tracker.load_model(f"models:/tiny-{name}@champion")
    assert state_digest(same) == state_digest(load_folder(folders[name])[0]) and tok is not None

    served = mlflow.pyfunc.load_model(f"models:/tiny-{name}@champion")
    lengths = [len(smollm2_tokenizer(served.predict(["Hello there"], params={"max_new_tokens": n})[0]).input_ids)
               for n in (2, 7)]
    assert lengths[0] <= 3 < lengths[1]  # (a re-tokenised decode may merge or split one token)


def test_compressed_tensors_champion_keeps_the_packed_export(registry, tmp_path):
    uri, folders, _ = registry
    ckpt = _download(uri, "ct-int4", tmp_path) / "model"
    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (folders["ct-int4"], ckpt))
    q_ours, q_theirs = ours["quantization_config"], theirs["quantization_config"]
    # transformers' save_pretrained drops only the empty fields (and compressed-tensors' version)
    assert {k: q_ours[k] for k in q_theirs} == q_theirs
    assert set(q_ours) - set(q_theirs) <= {"sparsity_config", "transform_config", "version"}
    assert not q_ours.get("sparsity_config") and not q_ours.get("transform_config")
    assert theirs["wanda_sparsity"] == ours["wanda_sparsity"]
    a, b = load_file(folders["ct-int4"] / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # vLLM gets the bit-checked codes
    # docs/serving.md, "from_pretrained": the downloaded folders as they are
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt.parent / "components" / "tokenizer")
    ids = tok("Hello there", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


# ------------------------------------------------------------------ without wanda_pipeline

def isolated_env(tmp: Path) -> tuple[Path, dict]:
    """A venv that sees this venv's site-packages through a .pth line: `.pth` files inside a
    directory added that way are not run, so the editable install's import hook never loads and
    `wanda_pipeline` cannot be imported, while mlflow, transformers and torch can."""
    import site

    venv = tmp / "iso"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ours = next(p for p in site.getsitepackages() if Path(p, "mlflow").is_dir())
    (next(venv.glob("lib/python*/site-packages")) / "parent.pth").write_text(ours + "\n")
    (venv / "bin" / "uvicorn").write_text(f"#!{venv}/bin/python\nimport sys\nfrom uvicorn.main import main\n"
                                          f"sys.exit(main())\n")
    (venv / "bin" / "uvicorn").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"  # mlflow shells out to `uvicorn`
    return venv / "bin" / "python", env


CHILD = """
import importlib.util, sys
assert importlib.util.find_spec("wanda_pipeline") is None, "wanda_pipeline is importable"
import mlflow, mlflow.pyfunc, mlflow.transformers
mlflow.set_tracking_uri(sys.argv[1])
pipe = mlflow.transformers.load_model("models:/tiny-ct-int4@champion")
print("pipeline", type(pipe).__name__, type(pipe.model).__name__)
for name in ("hf", "ct-int4"):
    m = mlflow.pyfunc.load_model(f"models:/tiny-{name}@champion")
    print(name, [len(pipe.tokenizer(m.predict(["Hello there"], params={"max_new_tokens": n})[0]).input_ids)
                 for n in (2, 7)])
"""


@pytest.mark.slow
def test_transformers_flavour_loads_where_wanda_pipeline_cannot_be_imported(registry, tmp_path):
    python, env = isolated_env(tmp_path)
    blocked = subprocess.run([str(python), "-c", "import wanda_pipeline"], env=env, cwd=tmp_path,
                             capture_output=True, text=True)
    assert blocked.returncode != 0 and "No module named 'wanda_pipeline'" in blocked.stderr
    out = subprocess.run([str(python), "-c", CHILD, registry[0]], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pipeline TextGenerationPipeline LlamaForCausalLM" in out.stdout
    for name in ("hf", "ct-int4"):
        short, long = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith(name + " "))
                                 .split(" ", 1)[1])
        assert short <= 3 < long


def _serve(python: str, env: dict, uri: str, name: str, cwd: Path):
    port = free_port()
    proc = subprocess.Popen([python, "-m", "mlflow", "models", "serve", "-m", f"models:/tiny-{name}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env={**env, "MLFLOW_TRACKING_URI": uri}, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("name,isolated", [("ct-int4", True), ("bitmask", False)])
def test_mlflow_models_serve_honours_max_new_tokens(registry, tmp_path, smollm2_tokenizer, name, isolated):
    """`mlflow models serve` as a user runs it: the transformers champion where wanda_pipeline
    cannot be imported, the bitmask one (this package's loader) with the venv's bin on PATH."""
    if isolated:
        python, env = isolated_env(tmp_path)
    else:
        python, env = Path(sys.executable), {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                                                  f"{os.environ['PATH']}"}
    proc, url = _serve(str(python), env, registry[0], name, tmp_path)
    try:
        wait_http(f"{url}/ping", timeout=300, proc=proc)
        lengths = []
        for n in (2, 7):
            r = requests.post(f"{url}/invocations", json={"inputs": ["Hello there"], "params": {"max_new_tokens": n}},
                              timeout=120)
            assert r.status_code == 200, r.text
            lengths.append(len(smollm2_tokenizer(r.json()["predictions"][0]).input_ids))
        assert lengths[0] <= 3 < lengths[1]
        bad = requests.post(f"{url}/invocations", json={"inputs": ["Hi"], "params": {"max_new_tokens": "many"}},
                            timeout=60)
        assert bad.status_code == 400  # the params schema is enforced, not ignored
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
