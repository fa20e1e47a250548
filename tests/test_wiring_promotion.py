"""Promotion against a registry that misbehaves on cue (tests/fake_registry.py): for every outcome,
exactly what is registered, tagged and aliased, and the exit code. Fail closed: any registry error
means no alias moves; every gate counts."""

from __future__ import annotations

import pytest

from tests.fake_registry import CALLS, FakeClient, FakeRegistry, FakeTracker, nll_examples, timeout
from wanda_pipeline.config import RegisterSpec
from wanda_pipeline.errors import TrackingError
from wanda_pipeline.tracking import promotion
from wanda_pipeline.tracking.registry import ModelRegistry

NAME = "m"
URI = "models:/m-123"
DENSE = {"ppl_wikitext2": 8.0, "zeroshot_mean": 0.6}
GOOD = {"ppl_wikitext2": 10.0, "zeroshot_mean": 0.55, "sparsity_total": 0.5}  # passes every gate below
# Ratio gates on the point estimate: these tests are about the registry calls, not the noise
# (tests/test_gates_paired.py covers the intervals); beat_champion is always paired.
GATES = {"max_ppl_ratio": 2.0, "min_zeroshot_ratio": 0.8, "beat_champion": "ppl_wikitext2", "bound": "point"}
OLD = {"ppl_wikitext2": 30.0}   # a champion the candidate clearly beats
BEST = {"ppl_wikitext2": 5.0}   # a champion the candidate clearly loses to


def promote(fake: FakeRegistry, monkeypatch, metrics=GOOD, gates=GATES):
    monkeypatch.setattr(promotion, "ModelRegistry", lambda tracker: fake)
    spec = RegisterSpec(model_name=NAME, gates=gates)
    examples = nll_examples(metrics["ppl_wikitext2"]) if "ppl_wikitext2" in metrics else {}
    return promotion.register_and_promote(object(), spec, "pipe", URI, dict(metrics), DENSE, 0.5, {"pipeline": "pipe"},
                                          examples=examples)


def tags(fake: FakeRegistry, version: str = "1") -> dict[str, str]:
    return fake.versions[NAME][version]


@pytest.mark.parametrize("champion", [None, OLD], ids=["no-champion", "worse-champion"])
def test_a_candidate_passing_every_gate_is_registered_then_aliased(monkeypatch, champion):
    fake = FakeRegistry(champion=champion)
    result = promote(fake, monkeypatch)
    assert result.promoted is True and result.version == "1" and result.reason == "passed all gates"
    assert (result.name, result.alias) == (NAME, "champion")
    assert [g["name"] for g in result.gates] == ["max_ppl_ratio", "min_zeroshot_ratio", "min_sparsity",
                                                 "beat_champion"]
    assert all(g["passed"] for g in result.gates)
    assert fake.uris == {(NAME, "1"): URI}
    assert fake.aliases == {(NAME, "champion"): "1"}
    t = tags(fake)
    assert t["pipeline"] == "pipe" and t["gates_passed"] == "true" and t["promoted"] == "true"
    assert t["promoted_to"] == "champion" and t["promotion"] == "gates" and t["promotion_reason"] == "passed all gates"
    assert "promotion_blocked_reason" not in t
    # registered before the alias moves; the alias is the last registry write that matters
    assert fake.calls.index("register") < fake.calls.index("set_alias")


@pytest.mark.parametrize("gate, metrics, champion", [
    ("max_ppl_ratio", {**GOOD, "ppl_wikitext2": 20.0}, None),          # 2.5x dense
    ("min_zeroshot_ratio", {**GOOD, "zeroshot_mean": 0.3}, None),      # 0.5x dense
    ("min_sparsity", {**GOOD, "sparsity_total": 0.4}, None),           # target 0.5
    ("beat_champion", GOOD, BEST),                                     # champion 5 < 10
    ("beat_champion", {k: v for k, v in GOOD.items() if k != "ppl_wikitext2"} | {"ppl_x": 1.0}, None),
])
def test_each_gate_alone_blocks_promotion(monkeypatch, gate, metrics, champion):
    gates = GATES if gate != "beat_champion" or champion else {"beat_champion": "ppl_wikitext2"}
    fake = FakeRegistry(champion=champion)
    result = promote(fake, monkeypatch, metrics, gates)  # a blocked promotion is no error: exit 0
    assert result.promoted is False and result.version == "1" and (result.name, result.alias) == (NAME, "champion")
    assert [g["name"] for g in result.gates if not g["passed"]] == [gate]
    assert result.reason.startswith(f"{gate}: ")
    assert fake.aliases == {} and "set_alias" not in fake.calls
    t = tags(fake)
    assert t["gates_passed"] == "false" and t["promoted"] == "false"
    assert t["promotion_blocked_reason"] == result.reason


def test_every_failed_gate_is_named_in_the_blocked_reason(monkeypatch):
    fake = FakeRegistry(champion=BEST)
    bad = {"ppl_wikitext2": 20.0, "zeroshot_mean": 0.3, "sparsity_total": 0.4}
    result = promote(fake, monkeypatch, bad)
    assert [g["name"] for g in result.gates if not g["passed"]] == ["max_ppl_ratio", "min_zeroshot_ratio",
                                                                     "min_sparsity", "beat_champion"]
    reason = tags(fake)["promotion_blocked_reason"]
    assert all(f"{g}:" in reason for g in ("max_ppl_ratio", "min_zeroshot_ratio", "min_sparsity", "beat_champion"))
    assert fake.aliases == {}


@pytest.mark.parametrize("call", ["champion_metrics", "champion_examples"])
@pytest.mark.parametrize("fault", [TrackingError("server down"), None], ids=["error", "timeout"])
def test_champion_lookup_failing_registers_unpromoted_and_exits_6(monkeypatch, fault, call):
    fault = fault or timeout(call)
    fake = FakeRegistry(champion=BEST, faults={call: fault})
    with pytest.raises(TrackingError) as err:
        promote(fake, monkeypatch)
    assert err.value.exit_code == 6
    assert str(err.value) == f"m v1 registered but NOT promoted: {fault}"
    assert fake.aliases == {} and "set_alias" not in fake.calls
    t = tags(fake)
    assert t["promoted"] == "false" and t["promotion_blocked_reason"] == f"registry error: {fault}"


@pytest.mark.parametrize("fault", [TrackingError("registering 'm' failed and was rolled back: quota"),
                                   timeout("register")], ids=["error", "timeout"])
def test_registration_failing_registers_nothing_aliases_nothing_and_exits_6(monkeypatch, fault):
    fake = FakeRegistry(champion=OLD, faults={"register": fault})
    with pytest.raises(TrackingError) as err:
        promote(fake, monkeypatch)
    assert err.value is fault and err.value.exit_code == 6
    assert fake.versions == {} and fake.aliases == {}
    assert fake.calls == ["champion_metrics", "champion_examples", "register"]


def test_an_interrupt_during_registration_moves_no_alias(monkeypatch):
    fake = FakeRegistry(faults={"register": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        promote(fake, monkeypatch)
    assert fake.aliases == {} and "set_alias" not in fake.calls


@pytest.mark.parametrize("fault", [TrackingError("could not set @champion"), timeout("set_alias")],
                         ids=["error", "timeout"])
def test_setting_the_alias_failing_leaves_the_old_champion_and_exits_6(monkeypatch, fault):
    fake = FakeRegistry(champion=OLD, faults={"set_alias": fault})
    fake.aliases[(NAME, "champion")] = "0"  # the old champion's version
    with pytest.raises(TrackingError) as err:
        promote(fake, monkeypatch)
    assert err.value.exit_code == 6 and str(err.value).startswith("m v1 passed every gate but was NOT promoted: ")
    assert fake.aliases == {(NAME, "champion"): "0"}
    t = tags(fake)
    assert t["promoted"] == "false" and t["promotion_blocked_reason"] == f"registry error: {fault}"


def test_tagging_the_promotion_failing_moves_no_alias_and_exits_6(monkeypatch):
    # The version must say it is promoted before the alias points at it; if that write fails, stop.
    fake = FakeRegistry(champion=OLD, faults={"tag": TrackingError("tag write refused")})
    with pytest.raises(TrackingError) as err:
        promote(fake, monkeypatch)
    assert str(err.value) == "m v1 passed every gate but was NOT promoted: could not tag the version as promoted"
    assert err.value.exit_code == 6 and fake.aliases == {} and "set_alias" not in fake.calls
    assert tags(fake)["promoted"] == "false"


def test_the_fake_knows_only_the_registry_calls():
    assert set(CALLS) == {n for n in vars(ModelRegistry) if not n.startswith("_") and n != "client"}
    with pytest.raises(AssertionError):
        FakeRegistry(faults={"delete": TrackingError("x")})


# --- the real ModelRegistry on a misbehaving client ---------------------------------------------------


def registry(client: FakeClient) -> ModelRegistry:
    return ModelRegistry(FakeTracker(client))


def test_champion_lookup_timeout_is_a_tracking_error_never_no_champion():
    err_timeout = TimeoutError("read timed out")
    with pytest.raises(TrackingError, match="cannot read the current @champion of 'm' from http://fake-registry"):
        registry(FakeClient({"get_model_version_by_alias": err_timeout}, champion=OLD)).champion_metrics(NAME,
                                                                                                         "champion")
    with pytest.raises(TrackingError, match="cannot read the metrics of @champion"):
        registry(FakeClient({"get_run": err_timeout}, champion=OLD)).champion_metrics(NAME, "champion")
    assert registry(FakeClient()).champion_metrics(NAME, "champion") is None  # really none
    assert registry(FakeClient(champion=OLD)).champion_metrics(NAME, "champion") == OLD


@pytest.mark.parametrize("call", ["create_registered_model", "create_model_version", "get_model_version",
                                  "set_model_version_tag"])
def test_registration_failing_at_any_call_is_rolled_back(call):
    client = FakeClient({call: TimeoutError("read timed out")})
    with pytest.raises(TrackingError, match="registering 'm' failed and was rolled back"):
        registry(client).register(URI, NAME, {"a": 1})
    assert client.versions == {} and client.models == set()


@pytest.mark.parametrize("status", ["FAILED_REGISTRATION", "PENDING_REGISTRATION"])
def test_a_version_that_never_becomes_ready_is_rolled_back(monkeypatch, status):
    from wanda_pipeline.tracking import registry as registry_module

    monkeypatch.setattr(registry_module.time, "sleep", lambda s: None)
    client = FakeClient(status=status)
    with pytest.raises(TrackingError, match=f"rolled back: .*{status}"):
        registry(client).register(URI, NAME, {"a": 1})
    assert client.versions == {} and client.models == set() and "set_model_version_tag" not in client.calls


def test_setting_the_alias_failing_raises_and_keeps_the_old_alias():
    client = FakeClient({"set_registered_model_alias": TimeoutError("read timed out")}, champion=OLD)
    reg = registry(client)
    version = reg.register(URI, NAME, {"a": 1})
    with pytest.raises(TrackingError, match="could not set @champion on 'm' v2"):
        reg.set_alias(NAME, version, "champion", reason="passed all gates", manual=False)
    assert client.aliases == {(NAME, "champion"): "1"}
    with pytest.raises(TrackingError, match="has no version 7"):
        reg.set_alias(NAME, "7", "champion", reason="x", manual=True)


def test_promotion_through_the_real_registry_on_a_fake_client(monkeypatch):
    client = FakeClient(champion=OLD)
    spec = RegisterSpec(model_name=NAME, gates=GATES)
    good = nll_examples(GOOD["ppl_wikitext2"])
    result = promotion.register_and_promote(FakeTracker(client), spec, "pipe", URI, dict(GOOD), DENSE, 0.5, {},
                                            examples=good)
    assert result.promoted and client.aliases == {(NAME, "champion"): "2"}
    assert client.versions[(NAME, "2")]["promoted"] == "true"
    client.faults["get_model_version_by_alias"] = TimeoutError("read timed out")
    with pytest.raises(TrackingError) as err:
        promotion.register_and_promote(FakeTracker(client), spec, "pipe", URI, dict(GOOD), DENSE, 0.5, {},
                                       examples=good)
    assert err.value.exit_code == 6 and client.aliases == {(NAME, "champion"): "2"}
    assert client.versions[(NAME, "3")]["promoted"] == "false"


def test_log_model_writes_the_folder_logs_its_sizes_and_returns_the_uri():
    from types import SimpleNamespace

    import torch

    logged = {}

    class Tracker:
        def log_metrics(self, metrics):
            logged["metrics"] = metrics

        def log_model(self, folder, metadata):
            logged["files"] = sorted(p.name for p in folder.iterdir())
            logged["metadata"] = metadata
            return URI

    model = torch.nn.Linear(4, 3)  # 15 float32 parameters: 60 bytes
    loaded = SimpleNamespace(model=model)
    uri = promotion.log_model(Tracker(), loaded, "hf", "pipe", 0.5,
                              lambda out: (out.mkdir(), (out / "w.bin").write_bytes(b"x" * 30)))
    assert uri == URI and logged["files"] == ["w.bin"]
    assert logged["metrics"] == {"model_stored_bytes": 30, "model_dense_bytes": 60, "model_stored_ratio": 0.5}
    assert logged["metadata"] == {"sparsity": 0.5, "pipeline": "pipe", "format": "hf"}


def test_the_dense_baselines_per_window_results_reach_the_interval_ratio_gate(monkeypatch):
    """With `bound: interval` the ratio gate needs the dense model's windows too: they must be
    handed on to the gates, or every interval ratio gate fails for want of them."""
    fake = FakeRegistry(champion=None)
    monkeypatch.setattr(promotion, "ModelRegistry", lambda tracker: fake)
    spec = RegisterSpec(model_name=NAME, gates={"max_ppl_ratio": 2.0})  # bound: interval, the default
    result = promotion.register_and_promote(object(), spec, "pipe", URI, dict(GOOD), DENSE, 0.5, {},
                                            examples=nll_examples(GOOD["ppl_wikitext2"]),
                                            dense_examples=nll_examples(DENSE["ppl_wikitext2"]))
    gate = next(g for g in result.gates if g["name"] == "max_ppl_ratio")
    assert gate["passed"] is True and gate["test"].startswith("paired bootstrap, ") and gate["interval"]
    assert result.promoted is True and fake.aliases == {(NAME, "champion"): "1"}
