"""GPTQ's tensor core against a small, independent implementation written here: the Optimal
Brain Quantizer form (the full damped inverse Hessian, updated by Gaussian elimination after
each column, float64, no lazy batches, no Cholesky), with the same mask, groups and act-order
rules. Plus: the output error beats RTN's on the same layer, pruned zeros stay exactly 0, the
codes are RTN's grid (so the exporter finds them), and the plugin's pinned options."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from wanda_pipeline.plugins import discover
from wanda_pipeline.quantizers.gptq import GPTQConfig, GPTQQuantizer, gptq_quantize
from wanda_pipeline.quantizers.rtn import RTNQuantizer, quantize_codes, quantize_rtn


def params_by_hand(g: torch.Tensor, bits: int, symmetric: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (stored in ``dtype``) and zero point of one group, compressed-tensors' RTN convention."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = g.float()
    if symmetric:
        s = (g.abs().amax(dim=1) / qmax).to(dtype)
        s = torch.where(s == 0, torch.ones_like(s), s)
        return s, torch.zeros_like(s, dtype=torch.float32)
    lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
    s = ((hi - lo) / (qmax - qmin)).to(dtype)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s, torch.clamp(torch.round(qmin - lo / s.float()), qmin, qmax)


def obq_reference(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool, act_order: bool,
                  percdamp: float = 0.01) -> torch.Tensor:
    """Codes of ``w`` by OBQ: quantise one column, spread its error over the columns left with
    the current inverse Hessian, then eliminate that column from the inverse. Zeros of ``w``
    are quantised to the zero code; groups are contiguous in the original column order. The
    error fed back is that of the value the model computes with: ``(q - zp) * scale`` in ``w``'s dtype."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, cols = w.shape
    dtype = w.dtype
    pruned = w == 0
    W = w.double().clone()
    H = h.double().clone()
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    order = sorted(range(cols), key=lambda c: -float(h[c, c])) if act_order else list(range(cols))
    scale, zero = {}, {}
    if act_order:  # static groups: from the weight before any feedback
        for g0 in range(0, cols, group):
            scale[g0], zero[g0] = params_by_hand(W[:, g0 : g0 + group], bits, symmetric, dtype)
    codes = torch.zeros(rows, cols)
    left = list(order)
    for c in order:
        g0 = c - c % group
        if g0 not in scale:  # dynamic: the group's values now, pruned entries as 0
            scale[g0], zero[g0] = params_by_hand(W[:, g0 : g0 + group].masked_fill(pruned[:, g0 : g0 + group], 0),
                                                 bits, symmetric, dtype)
        s, z = scale[g0].double(), zero[g0].double()
        q = torch.clamp(torch.round(W[:, c] / s + z), qmin, qmax)
        q[pruned[:, c]] = z[pruned[:, c]]
        codes[:, c] = q.float()
        value = ((q - z).to(dtype) * scale[g0]).double()
        err = (W[:, c] - value) / Hinv[c, c]
        left.remove(c)
        W[:, left] -= err.unsqueeze(1) * Hinv[c, left].unsqueeze(0)
        Hinv -= Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]
    return codes


def layer(rows: int = 24, cols: int = 48, tokens: int = 200, seed: int = 0, sparsity: float = 0.5):
    """A random pruned weight and inputs X (tokens, cols) like a language model's: a few shared
    directions plus noise, uneven column scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 6, generator=gen) @ torch.randn(6, cols, generator=gen)
    x = (x + 0.3 * torch.randn(tokens, cols, generator=gen)) * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=gen)
    k = int(cols * sparsity)
    if k:
        drop = torch.argsort((w.abs() * x.norm(dim=0)), dim=1)[:, :k]  # Wanda's score, per row
        w.scatter_(1, drop, 0.0)
    return w, x, 2 / tokens * x.t() @ x


CASES = [  # bits, group, symmetric, act_order, blocksize
    (4, 16, True, False, 128), (4, 16, False, False, 128), (8, 16, True, False, 128), (8, 48, False, False, 128),
    (4, 12, True, False, 8),    # groups straddle lazy batches: pending feedback must be added
    (4, 20, False, False, 16),  # a last group of 8 columns
    (4, 16, True, True, 128), (4, 16, False, True, 12), (4, 48, True, True, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group,symmetric,act_order,blocksize", CASES)
def test_gptq_equals_the_obq_reference(bits, group, symmetric, act_order, blocksize, dtype):
    w, _, h = layer(seed=bits + group)
    w = w.to(dtype)
    qc, fallbacks = gptq_quantize(w, h, bits, group, symmetric, blocksize=blocksize, act_order=act_order)
    expected = obq_reference(w, h, bits, group, symmetric, act_order)
    assert fallbacks == 0
    differ = int((qc.codes.float() != expected).sum())
    assert differ <= w.numel() // 500, f"{differ} of {w.numel()} codes differ from the reference"
    assert qc.group_size == group and qc.bits == bits and qc.scale.shape == (w.shape[0], -(-w.shape[1] // group))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_output_error_is_below_rtn_and_zeros_stay_zero(bits, symmetric, sparsity):
    w, x, h = layer(rows=32, cols=64, tokens=256, seed=bits, sparsity=sparsity)
    qc, _ = gptq_quantize(w, h, bits, 16, symmetric)
    q = qc.dequantize()
    rtn = quantize_rtn(w, bits, 16, symmetric)
    err_gptq = torch.linalg.norm((w - q) @ x.t())
    err_rtn = torch.linalg.norm((w - rtn) @ x.t())
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    pruned = w == 0
    assert bool((q[pruned] == 0).all()), "a pruned weight came back non-zero"
    zp = qc.zero_point.repeat_interleave(16, dim=1) if not symmetric else torch.zeros_like(qc.codes)
    assert torch.equal(qc.codes[pruned], zp[pruned]), "a pruned weight must carry the zero code"


def test_act_order_uses_static_groups_in_the_original_column_order():
    """With act_order every group's scale and zero point are RTN's on the pruned weight, and the
    codes still form contiguous groups (compressed-tensors stores no g_idx)."""
    w, _, h = layer(seed=3)
    for symmetric in (True, False):
        qc, _ = gptq_quantize(w, h, 4, 16, symmetric, act_order=True)
        rtn = quantize_codes(w, 4, 16, symmetric)
        assert torch.equal(qc.scale, rtn.scale)
        assert symmetric or torch.equal(qc.zero_point, rtn.zero_point)
        dynamic, _ = gptq_quantize(w, h, 4, 16, symmetric)
        assert not torch.equal(dynamic.scale[:, 1:], rtn.scale[:, 1:]), "without act_order groups follow the feedback"
        assert torch.equal(dynamic.scale[:, 0], rtn.scale[:, 0]), "the first group sees no feedback yet"


def test_a_dead_input_is_rounded_and_kept():
    """An input the calibration never fed (zero Hessian row) is rounded like RTN, not zeroed."""
    w, x, _ = layer(sparsity=0.0, seed=5)
    x[:, 7] = 0
    h = 2 / x.shape[0] * x.t() @ x
    qc, _ = gptq_quantize(w, h, 8, 48, True)
    rtn = quantize_codes(w, 8, 48, True)
    assert torch.equal(qc.codes[:, 7], rtn.codes[:, 7]) and bool((qc.dequantize()[:, 7] != 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plugin_records_codes_the_exporter_recovers(dtype):
    w, _, h = layer(seed=9)
    w = w.to(dtype)
    quantizer = GPTQQuantizer(GPTQConfig(bits=4, group_size=16, symmetric=False))
    out = quantizer.quantize_weight(w.clone(), {"gram": h})
    assert out.dtype == dtype and bool((out[w == 0] == 0).all())
    codes = quantizer.codes_for(out)
    assert codes is not None and torch.equal(codes.dequantize().to(dtype), out)
    assert quantizer.codes_for(out + 1) is None
    assert quantizer.counters == {"hessian_fallbacks": 0, "linears": 1}
    assert quantizer.bits_per_weight((24, 48)) == RTNQuantizer(quantizer.config).bits_per_weight((24, 48))
    with pytest.raises(ValueError, match="needs the layer's `gram`"):
        quantizer.quantize_weight(w)


def test_config_defaults_are_pinned_and_unknown_options_refused():
    c = GPTQConfig()
    assert c.model_dump() == {"bits": 4, "group_size": 128, "symmetric": True, "scale_bits": 16, "percdamp": 0.01,
                              "blocksize": 128, "act_order": True, "max_damp_retries": 4}
    for bad in ({"bits": 3}, {"group_size": 0}, {"percdamp": 0}, {"blocksize": 0}, {"groupsize": 64}):
        with pytest.raises(ValidationError):
            GPTQConfig(**bad)
    quantizer = discover().create("quantizer", "gptq", {"bits": 8, "group_size": 64})
    assert isinstance(quantizer, GPTQQuantizer) and quantizer.required_stats() == {"gram"}
