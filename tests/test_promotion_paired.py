"""beat_champion end to end on a real MLflow sqlite store: each run logs its per-example results,
the next run's gate reads the champion's from the champion's run, and the version tags say
which test decided, with what interval."""

import numpy as np

from wanda_pipeline.config import RegisterSpec
from wanda_pipeline.per_example import ARTIFACT
from wanda_pipeline.plugins import EvalResult
from wanda_pipeline.tracking import MLflowTracker
from wanda_pipeline.tracking.promotion import register_and_promote
from wanda_pipeline.tracking.record import log_results

BASE = np.random.default_rng(7).normal(3.0, 0.4, size=24)
NOISE = np.random.default_rng(8).normal(0.0, 0.01, size=24)


def one_run(tracker, tmp_path, name, nll, windows_digest="w1"):
    nll = [float(v) for v in nll]
    metrics = {"ppl_wikitext2": float(np.exp(np.mean(nll))), "sparsity_total": 0.5}
    examples = {"ppl_wikitext2": {"kind": "nll", "ids": list(range(len(nll))), "values": nll,
                                  "digest": windows_digest}}
    result = EvalResult(metrics=metrics, protocol={"windows": len(nll)}, examples=examples)
    spec = RegisterSpec(model_name="m", gates={"beat_champion": "ppl_wikitext2"})
    folder = tmp_path / name
    folder.mkdir()
    (folder / "weights.txt").write_text(name)
    with tracker.run(name) as run_id:
        log_results(tracker, metrics, {}, [], {"perplexity": result}, "digest")
        tracker._mlflow.log_artifacts(str(folder), "model")
        reg = register_and_promote(tracker, spec, "p", f"runs:/{run_id}/model", metrics, {}, 0.5, {},
                                   examples=examples)
    return run_id, reg


def test_paired_promotion_reads_the_champions_examples_from_its_run(tmp_path):
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'm.db'}", "paired")
    tracker.check(registry=True)
    client = tracker.client

    first_run, first = one_run(tracker, tmp_path, "first", BASE)
    assert first.promoted and "no current champion" in first.gates[-1]["detail"]
    assert ARTIFACT in {f.path for f in client.list_artifacts(first_run)}

    _, better = one_run(tracker, tmp_path, "better", BASE - 0.02 + NOISE)
    assert better.promoted, better.reason
    tags = client.get_model_version("m", better.version).tags
    assert tags["gate.beat_champion"] == "pass" and tags["gate.beat_champion.outcome"] == "better"
    assert tags["gate.beat_champion.test"].startswith("paired bootstrap over windows")
    assert "(95%, n=24)" in tags["gate.beat_champion.interval"] and tags["gates.confidence"] == "0.95"

    _, tie = one_run(tracker, tmp_path, "tie", BASE - 0.02 + NOISE[::-1])  # the champion's level, other noise
    assert not tie.promoted and "tie within noise at 95%" in tie.reason
    tie_tags = client.get_model_version("m", tie.version).tags
    assert "tie within noise" in tie_tags["promotion_blocked_reason"]
    assert tie_tags["gate.beat_champion.outcome"] == "tie"

    _, other = one_run(tracker, tmp_path, "other-windows", BASE - 0.5, windows_digest="w2")
    assert not other.promoted and "different contents" in other.reason  # fails closed, however much better
    assert str(client.get_model_version_by_alias("m", "champion").version) == better.version
