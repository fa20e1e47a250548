"""Zero-shot with upstream lm-eval on local copies of the paper's seven tasks."""

import json
import math
from pathlib import Path

import jinja2
import lm_eval
import pytest
import torch
import yaml

from tests.conftest import needs_data
from wanda_pipeline.evaluators.zeroshot import (
    LOCAL_FILES,
    PAPER_TASKS,
    ZeroShotConfig,
    ZeroShotEvaluator,
    convert,
)

BUILTIN = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml"}


class _AnyTag(yaml.SafeLoader):
    pass


_AnyTag.add_multi_constructor("!", lambda loader, suffix, node: None)


def hub_format(task, row):
    """The local row in the layout of the hub dataset the built-in task reads."""
    if task == "boolq":
        return {"passage": row["passage"], "question": row["question"], "label": int(row["label"] == "true")}
    if task == "rte":
        return {"sentence1": row["premise"], "sentence2": row["hypothesis"], "label": int(row["label"] != "entailment")}
    q = row["question"]
    doc = {"choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
           "answerKey": row["answerKey"]}
    doc["question_stem" if task == "openbookqa" else "question"] = q["stem"]
    return doc


def render(template, doc):
    if template in doc:
        return doc[template]
    return jinja2.Template(template).render(**doc)


@needs_data
@pytest.mark.parametrize("task", sorted(BUILTIN_YAML))
def test_local_prompts_match_lm_eval_builtin_templates(task, data):
    cfg = yaml.load((BUILTIN / BUILTIN_YAML[task]).read_text(), Loader=_AnyTag)
    src = data / "zeroshot" / LOCAL_FILES[task]
    rows = [json.loads(line) for line in src.read_text().splitlines()[:25]]
    ours = convert(task, src)[:25]
    for row, rec in zip(rows, ours, strict=True):
        doc = hub_format(task, row)
        assert rec["query"] == render(cfg["doc_to_text"], doc)
        choices = cfg["doc_to_choice"]
        expected_choices = choices if isinstance(choices, list) else eval(render(choices, doc))  # noqa: S307
        assert rec["choices"] == expected_choices
        target = render(cfg["doc_to_target"], doc) if isinstance(cfg["doc_to_target"], str) else cfg["doc_to_target"]
        assert rec["gold"] == int(doc["label"] if target == "label" else target)


@needs_data
def test_hellaswag_and_winogrande_conversions(data):
    hs = convert("hellaswag", data / "zeroshot" / LOCAL_FILES["hellaswag"])
    assert len(hs) == 10042 and all(len(r["choices"]) == 4 and 0 <= r["gold"] < 4 for r in hs)
    wg = convert("winogrande", data / "zeroshot" / LOCAL_FILES["winogrande"])
    labels = (data / "zeroshot" / "winogrande" / "dev-labels.lst").read_text().split()
    assert len(wg) == 1267 and [r["gold"] + 1 for r in wg] == [int(x) for x in labels]
    assert all(r["target"].startswith(" ") for r in wg)


def loglik(model, tok, context, continuation):
    """Sum of log-probabilities of ``continuation`` after ``context``, split the way HFLM splits it."""
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


@pytest.mark.slow
@needs_data
def test_all_seven_tasks_small_limit_and_accuracy_by_hand(smollm2, data):
    model, tok, _ = smollm2
    result = ZeroShotEvaluator(ZeroShotConfig(limit=6, batch_size=4)).evaluate(model, tok)
    m = result.metrics
    for task in PAPER_TASKS:  # an accuracy over 6 documents is a whole number of sixths
        assert m[f"zeroshot_{task}_acc"] * 6 == pytest.approx(round(m[f"zeroshot_{task}_acc"] * 6), abs=1e-9)
    assert m["zeroshot_mean"] == pytest.approx(sum(m[f"zeroshot_{t}_acc"] for t in PAPER_TASKS) / 7)
    assert json.loads(result.protocol["n_samples"]) == {t: 6 for t in PAPER_TASKS}
    assert result.protocol["num_fewshot"] == 0 and result.protocol["limit"] == 6
    # BoolQ accuracy recomputed by hand from the model's log-likelihoods of " no" / " yes".
    docs = convert("boolq", data / "zeroshot" / LOCAL_FILES["boolq"])[:6]
    hits = [max(range(2), key=lambda c: loglik(model, tok, d["query"], " " + d["choices"][c])) == d["gold"]
            for d in docs]
    assert m["zeroshot_boolq_acc"] == pytest.approx(sum(hits) / 6)


@pytest.mark.slow
@needs_data
def test_one_full_task_rte(smollm2):
    model, tok, _ = smollm2
    result = ZeroShotEvaluator(ZeroShotConfig(tasks=["rte"], batch_size=8)).evaluate(model, tok)
    assert json.loads(result.protocol["n_samples"]) == {"rte": 277}
    row = result.tables["zeroshot"][0]
    # acc is hits/277, and lm-eval's stderr of a mean of 0/1 scores is sqrt(acc (1 - acc) / (n - 1)).
    assert row["acc"] * 277 == pytest.approx(round(row["acc"] * 277), abs=1e-6)
    assert row["acc_stderr"] == pytest.approx(math.sqrt(row["acc"] * (1 - row["acc"]) / 276), rel=1e-6)
    # the per-example results behind it: one 0/1 per document, by lm-eval doc_id
    kept = result.examples["zeroshot_rte_acc"]
    assert kept["ids"] == list(range(277)) and sum(kept["values"]) == round(row["acc"] * 277)
    assert result.metrics["zeroshot_rte_n"] == 277 and result.metrics["zeroshot_mean_n"] == 277


def test_unknown_local_task_is_rejected():
    with pytest.raises(ValueError, match="no local data"):  # pydantic ValidationError is a ValueError
        ZeroShotEvaluator(ZeroShotConfig(tasks=["mmlu"]))
