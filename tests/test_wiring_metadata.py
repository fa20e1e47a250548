"""Export metadata against models built here with a known pattern on each linear, mixed patterns
included, across architectures (Conv1D too). The expected values come from plain loops in this file."""

from __future__ import annotations

import json

import pytest
import torch

from wanda_pipeline import stages
from wanda_pipeline.config import EngineSpec
from wanda_pipeline.export import save
from wanda_pipeline.export.metadata import sparsity_metadata
from wanda_pipeline.models import find_blocks, find_linears, linear_weight_view
from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer
from wanda_pipeline.tiny_models import tiny_model


def zero_nm(w: torch.Tensor, n: int, m: int) -> None:
    """Zero the n smallest |w| of every m consecutive inputs of every row (a plain loop)."""
    with torch.no_grad():
        for r in range(w.shape[0]):
            for c in range(0, w.shape[1], m):
                group = w[r, c:c + m]
                for j in sorted(range(m), key=lambda j: float(group[j].abs()))[:n]:
                    w[r, c + j] = 0


def zero_unstructured(w: torch.Tensor, fraction: float, seed: int) -> None:
    """Zero about ``fraction`` of the entries at random, and make every row break 2:4 and 4:8."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w[torch.rand(w.shape, generator=gen) < fraction] = 0
        w[:, :8] = 1.0  # the first 8 inputs of every row: no zero at all


def follows(w: torch.Tensor, n: int, m: int) -> bool:
    if w.shape[1] % m:
        return False
    return all(sum(int(w[r, c + j] == 0) for j in range(m)) >= n
               for r in range(w.shape[0]) for c in range(0, w.shape[1], m))


def block_linears(model, exclude=None) -> dict[str, torch.Tensor]:
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": linear_weight_view(lin) for i, b in enumerate(blocks)
            for n, lin in find_linears(b, None, exclude).items()}


# which pattern each linear gets, by a substring of its name; the rest stay 2:4
MIXED = {"q_proj": "4:8", "c_attn": "4:8", "fc1": "4:8", "up_proj": "unstructured", "c_fc": "unstructured",
         "fc2": "unstructured", "mlp.c_proj": "unstructured"}


def build(family: str, plan: dict[str, str], seed: int = 0):
    model = tiny_model(family, seed=seed, layers=2)
    chosen = {}
    for name, w in block_linears(model).items():
        pattern = next((p for k, p in plan.items() if k in name), "2:4")
        if pattern == "unstructured":
            zero_unstructured(w, 0.5, seed=len(chosen))
        else:
            zero_nm(w, *map(int, pattern.split(":")))
        chosen[name] = pattern
    return model, chosen


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "qwen2"])
def test_per_linear_and_model_structure_of_a_mixed_model(family):
    model, chosen = build(family, MIXED)
    weights = block_linears(model)
    assert len(set(chosen.values())) == 3, chosen  # really mixed
    for requested in ("2:4", "4:8", "unstructured"):
        meta = sparsity_metadata(model, requested)
        n_m = None if requested == "unstructured" else tuple(map(int, requested.split(":")))
        want = {name: "unstructured" if n_m is None or not follows(w, *n_m) else requested
                for name, w in weights.items()}
        assert {k: v["structure"] for k, v in meta["linears"].items()} == want
        assert meta["sparsity_structure"] == "unstructured"  # some linear breaks every pattern
        for name, w in weights.items():
            assert meta["linears"][name]["sparsity"] == pytest.approx(float((w == 0).sum()) / w.numel())
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        assert meta["global_sparsity"] == pytest.approx(zeros / sum(w.numel() for w in weights.values()))
        assert meta["targets"] == list(weights) and meta["requested_pattern"] == requested
    # the 2:4 linears also hold 4:8 (2 of 4 zero twice is 4 of 8); 4:8 ones do not hold 2:4
    meta48, meta24 = sparsity_metadata(model, "4:8"), sparsity_metadata(model, "2:4")
    for name, pattern in chosen.items():
        assert meta48["linears"][name]["structure"] == ("unstructured" if pattern == "unstructured" else "4:8")
        if pattern == "2:4":
            assert meta24["linears"][name]["structure"] == "2:4"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_whose_every_target_follows_the_pattern_reports_it(family):
    model, _ = build(family, {})
    meta = sparsity_metadata(model, "2:4")
    assert meta["sparsity_structure"] == "2:4" and meta["format"] == "dense"
    assert sparsity_metadata(model)["requested_pattern"] == "unstructured"  # the default
    # 3 does not divide the 32/64/128 inputs: no linear can follow 2:3
    assert {v["structure"] for v in sparsity_metadata(model, "2:3")["linears"].values()} == {"unstructured"}
    assert sparsity_metadata(model, "4:8")["sparsity_structure"] == "4:8"
    assert sparsity_metadata(model, "3:4")["sparsity_structure"] == "unstructured"
    assert sparsity_metadata(model, "unstructured")["sparsity_structure"] == "unstructured"


def test_excluded_linears_are_ignored_not_measured():
    model, _ = build("llama", {"up_proj": "unstructured"})
    meta = sparsity_metadata(model, "2:4", exclude=r"mlp\.up_proj")
    assert meta["sparsity_structure"] == "2:4"  # the one unstructured linear is left out
    kept = block_linears(model, exclude=r"mlp\.up_proj")
    assert meta["targets"] == list(kept) and set(meta["linears"]) == set(kept)
    assert meta["ignore"] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    only = sparsity_metadata(model, "2:4", include=r"self_attn\.q_proj")
    assert only["targets"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    none = sparsity_metadata(model, "2:4", include="no-such-linear")  # nothing measured, nothing claimed
    assert (none["targets"], none["global_sparsity"], none["sparsity_structure"]) == ([], 0.0, "unstructured")


@pytest.mark.parametrize("bits, group", [(4, 16), (8, 32), (4, 4096)])
def test_the_export_carries_the_metadata_bits_and_group_size(tmp_path, bits, group):
    model, _ = build("llama", MIXED)
    quantizer = RTNQuantizer(RTNConfig(bits=bits, group_size=group))
    stages.quantize(model, quantizer, EngineSpec())  # rounding adds zeros: measure after it
    expected = sparsity_metadata(model, "2:4")
    assert {v["structure"] for v in expected["linears"].values()} == {"2:4", "unstructured"}
    out = save(model, None, tmp_path / "m", "compressed-tensors", {}, quantizer=quantizer, pattern="2:4")
    cfg = json.loads((out / "config.json").read_text())
    meta = cfg["wanda_sparsity"]
    assert meta["linears"] == expected["linears"] and meta["targets"] == expected["targets"]
    assert meta["sparsity_structure"] == "unstructured" and meta["format"] == "dense"
    scheme = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert scheme["num_bits"] == bits and scheme["type"] == "int"
    # a group as wide as every row is per-channel in compressed-tensors
    assert (scheme["strategy"], scheme["group_size"]) == (("channel", None) if group == 4096 else ("group", group))
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
