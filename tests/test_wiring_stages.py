"""The stage functions hand their callees what the spec says: calibration settings, the cache key's
inputs, the export's pattern and selection, the quantize report's arithmetic. Each is checked
against the callee's arguments or a computation written here (issue 21)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch

from wanda_pipeline import stages
from wanda_pipeline.config import CalibrationSpec, EngineSpec, PipelineSpec
from wanda_pipeline.errors import RunError
from wanda_pipeline.models import ModelInfo, find_blocks, find_linears
from wanda_pipeline.plugins import discover
from wanda_pipeline.pruning import PruneOutcome


@pytest.fixture
def loaded(tiny_dir):
    return stages.load(PipelineSpec(model={"source": str(tiny_dir)}, pruner={"name": "wanda"}).model)


def test_calibrate_hands_the_windows_every_setting(loaded, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(stages, "calibration_windows", lambda *a, **k: seen.update(args=a, kwargs=k))
    spec = CalibrationSpec(source="c4", path=str(tmp_path / "c.jsonl"), nsamples=3, seqlen=24, seed=5)
    stages.calibrate(spec, loaded)
    assert seen["args"] == ("c4", loaded.tokenizer, 3, 24, 5, str(tmp_path / "c.jsonl"))
    assert seen["kwargs"] == {"model": loaded.model}  # self-calibration samples from this model
    stages.calibrate(CalibrationSpec(source="c4", seqlen=None), loaded)
    assert seen["args"][3] == min(2048, loaded.info.max_positions)  # no seqlen: the model's context, capped


def _stub(folder, fingerprint="fp", tokenizer=("a", "b")):
    info = ModelInfo(source="m", resolved_path=str(folder), family="llama", n_blocks=1, blocks_path="layers",
                     dtype="float32", fingerprint=fingerprint, max_positions=64)
    return stages.Loaded(model=None, tokenizer=list(tokenizer), info=info)


def test_the_calibration_cache_key_follows_every_input_it_names(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_DATA_DIR", str(tmp_path / "no-data"))
    data = tmp_path / "c.txt"
    data.write_text("some text")
    model = tmp_path / "model"
    model.mkdir()
    spec = CalibrationSpec(source=str(data), nsamples=2, seqlen=8, seed=0)
    key = stages.calibration_key(spec, _stub(model))
    assert key.startswith("calib-") and len(key) == 6 + 32 and key == stages.calibration_key(spec, _stub(model))
    others = {"seed": stages.calibration_key(spec.model_copy(update={"seed": 1}), _stub(model)),
              "fingerprint": stages.calibration_key(spec, _stub(model, fingerprint="other")),
              "vocabulary": stages.calibration_key(spec, _stub(model, tokenizer=("a", "b", "c"))),
              "tokenizer class": stages.calibration_key(spec, stages.Loaded(None, ("a", "b"), _stub(model).info))}
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        (model / name).write_text(name)
        others[name] = stages.calibration_key(spec, _stub(model))
    data.write_text("other text")
    others["data bytes"] = stages.calibration_key(spec, _stub(model))
    assert len({key, *others.values()}) == 1 + len(others), others
    path_spec = CalibrationSpec(source="c4", path=str(data), nsamples=2, seqlen=8, seed=0)
    assert stages.calibration_key(path_spec, _stub(model)).startswith("calib-")  # a path is local data too


@pytest.mark.parametrize("source", ["c4", "wikitext2", "missing.txt"])
def test_data_from_the_hub_or_a_missing_file_is_never_cached(tmp_path, monkeypatch, source):
    monkeypatch.setenv("WANDA_DATA_DIR", str(tmp_path))  # holds no C4 or WikiText-2 files
    monkeypatch.chdir(tmp_path)
    assert stages.calibration_key(CalibrationSpec(source=source), _stub(tmp_path)) is None


def test_self_calibration_is_cached_on_the_model_alone(tmp_path):
    key = stages.calibration_key(CalibrationSpec(source="self", nsamples=2, seqlen=8), _stub(tmp_path))
    assert key.startswith("calib-")


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * (3 * 4096 + 7)  # over 3 MiB: several chunks
    path.write_bytes(data)
    assert stages.file_digest(path) == hashlib.sha256(data).hexdigest()


def test_export_hands_the_writer_the_pattern_and_the_selection(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("wanda_pipeline.export.save", lambda *a, **k: seen.update(args=a, kwargs=k) or tmp_path)
    spec = PipelineSpec(model={"source": "m"}, pruner={"name": "wanda", "pattern": "2:4"},
                        engine={"include": "q_proj", "exclude": "k_proj"})
    loaded = stages.Loaded(model="M", tokenizer="T", info=None)
    assert stages.export_model(loaded, tmp_path, "hf", {"p": 1}, spec, quantizer="Q") == tmp_path
    assert seen["args"] == ("M", "T", tmp_path, "hf", {"p": 1})
    assert seen["kwargs"] == {"quantizer": "Q", "pattern": "2:4", "include": "q_proj", "exclude": "k_proj",
                              "overwrite": False}
    stages.export_model(loaded, tmp_path, "hf", {}, PipelineSpec(model={"source": "m"}, pruner={"name": "wanda"}))
    assert seen["kwargs"]["pattern"] == "unstructured" and seen["kwargs"]["quantizer"] is None


def test_quantize_reports_bytes_and_bits_over_the_selected_linears(loaded):
    rtn = discover().create("quantizer", "rtn", {"bits": 8, "group_size": 32})
    model = loaded.model
    dense = sum(p.numel() * 4 for p in model.parameters())  # float32
    _, blocks = find_blocks(model)
    chosen = [lin for b in blocks for lin in find_linears(b, "self_attn", "k_proj").values()]
    numel = sum(lin.weight.numel() for lin in chosen)
    left = {id(lin): lin.weight.clone() for b in blocks for lin in find_linears(b, "k_proj|mlp", None).values()}
    before = chosen[0].weight.clone()
    report = stages.quantize(model, rtn, EngineSpec(include="self_attn", exclude="k_proj"))
    assert left and all(torch.equal(lin.weight, left[id(lin)]) for b in blocks
                        for lin in find_linears(b, "k_proj|mlp", None).values())  # not selected: untouched
    assert not torch.equal(chosen[0].weight, before)
    per_weight = rtn.bits_per_weight(tuple(chosen[0].weight.shape))
    assert report.quantized_linears == len(chosen) and report.dense_model_bytes == dense
    assert report.bits_per_weight == pytest.approx(per_weight)
    assert report.model_bytes == int(dense - 4 * numel + per_weight * numel / 8)


def test_a_quantizer_that_moves_a_zero_is_named_with_its_block_and_linear(loaded):
    class Bad:
        def quantize_weight(self, w):
            return w + 1

        def bits_per_weight(self, shape):
            return 4.0

    w = find_linears(find_blocks(loaded.model)[1][0], None, None)
    first = next(iter(w))
    with torch.no_grad():
        w[first].weight[0, 0] = 0
    with pytest.raises(RunError) as err:
        stages.quantize(loaded.model, Bad(), EngineSpec())
    assert str(err.value).startswith(f"quantizer Bad turned 1 pruned zeros of block 0 {first!r} non-zero")


@pytest.mark.parametrize("outcome", [None, SimpleNamespace(quantized=None)])
def test_a_calibrated_quantizer_on_a_finished_model_is_refused(loaded, outcome):
    gptq = discover().create("quantizer", "gptq", {"bits": 4})
    with pytest.raises(RunError) as err:
        stages.quantize(loaded.model, gptq, EngineSpec(), outcome)
    assert str(err.value) == (f"quantizer {type(gptq).__name__} is calibrated: it runs in the prune stage (pass it to "
                              "stages.prune), not on a finished model")


def test_a_calibrated_quantizer_reports_what_it_did_in_the_prune_stage(loaded):
    from wanda_pipeline.quantizers.calibrated import QuantTally

    gptq = discover().create("quantizer", "gptq", {"bits": 4})
    tally = QuantTally(linears=3, numel=100, bits=450.0, zeros_before=40, zeros_after=41, seconds=2.5)
    outcome = PruneOutcome(block_ratios=[], engine=None, quantized=tally)
    report = stages.quantize(loaded.model, gptq, EngineSpec(), outcome)
    dense = sum(p.numel() * 4 for p in loaded.model.parameters())
    assert (report.quantized_linears, report.bits_per_weight, report.zeros_before, report.zeros_after,
            report.seconds) == (3, 4.5, 40, 41, 2.5)
    assert report.model_bytes == int(dense - 400 + 450 / 8)


@pytest.mark.parametrize("returns, message", [
    (ValueError("boom"), "evaluator 'e' crashed: ValueError: boom"),
    ({"ppl": 1.0}, "evaluator 'e' returned dict, expected EvalResult"),
])
def test_an_evaluator_that_crashes_or_returns_the_wrong_type_is_a_plugin_error(returns, message):
    from wanda_pipeline.errors import PluginError

    class Evaluator:
        def evaluate(self, model, tokenizer):
            if isinstance(returns, Exception):
                raise returns
            return returns

    with pytest.raises(PluginError) as err:
        stages.evaluate(None, None, {"e": Evaluator()})
    assert str(err.value) == message


def test_peak_rss_is_the_kernels_high_water_mark_in_bytes():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = stages.peak_rss_bytes()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert before * 1024 <= peak <= after * 1024  # Linux reports KiB


@pytest.mark.parametrize("exc, message", [
    (FileExistsError("x"), "save folder {path} appeared while the run was going (another run?); nothing was "
                           "written. Choose another folder or set save.overwrite"),
    (OSError(28, "No space left on device"), "could not write {path}: [Errno 28] No space left on device; nothing "
                                             "was left half-written"),
])
def test_a_save_that_fails_says_what_happened_to_the_folder(monkeypatch, tmp_path, exc, message):
    from wanda_pipeline.config import SaveSpec
    from wanda_pipeline.errors import OutputError

    def export(*a, **k):
        raise exc

    monkeypatch.setattr(stages, "export_model", export)
    with pytest.raises(OutputError) as err:
        stages.save(None, SaveSpec(path=str(tmp_path / "o")), {}, None)
    assert str(err.value) == message.format(path=tmp_path / "o")


def test_load_hands_the_loader_every_model_option(monkeypatch):
    from wanda_pipeline.config import ModelSpec

    seen = {}
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: seen.update(args=a, kwargs=k) or ("M", "T", "I"))
    spec = ModelSpec(source="org/m", dtype="bfloat16", trust_remote_code=True, revision="abc123")
    assert stages.load(spec, stream=True) == stages.Loaded("M", "T", "I")
    assert seen == {"args": ("org/m", "bfloat16", True, "abc123"), "kwargs": {"stream": True}}


def test_build_plugins_keeps_every_evaluator_and_collects_each_bad_plugin():
    spec = PipelineSpec(model={"source": "m"}, pruner={"name": "wanda", "sparsity": 0.3},
                        quantizer={"name": "rtn", "bits": 8, "group_size": 32},
                        evaluators=[{"name": "sparsity"}, {"name": "perplexity", "windows": 2},
                                    {"name": "perplexity", "windows": 3}])
    plugins = stages.build_plugins(spec, discover())
    assert list(plugins.evaluators) == ["sparsity", "perplexity", "perplexity_2"]
    assert plugins.evaluators["perplexity_2"].config.windows == 3 and plugins.quantizer.config.bits == 8
    assert plugins.pruner.config.sparsity == 0.3
    bad = PipelineSpec(model={"source": "m"}, pruner={"name": "wanda", "sparsity": 0.3, "nonsense": 1},
                       quantizer={"name": "rtn", "bits": 3}, evaluators=[{"name": "sparsity"}])
    problems = []
    plugins = stages.build_plugins(bad, discover(), problems)
    assert plugins.pruner is None and plugins.quantizer is None and list(plugins.evaluators) == ["sparsity"]
    assert len(problems) == 2 and all("nonsense" in str(problems[0]) and str(p) for p in problems)
    with pytest.raises(Exception, match="nonsense"):
        stages.build_plugins(bad, discover())  # without a list: the first problem stops it


@pytest.mark.parametrize("progress", [True, False])
def test_make_engine_passes_the_progress_choice(progress):
    assert stages.make_engine(EngineSpec(), progress).progress is progress
    assert stages.make_engine(EngineSpec()).progress is True
