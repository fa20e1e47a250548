"""RTN's integer codes: what the exporter packs must reproduce the quantised weight exactly."""

import pytest
import torch

from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer, quantize_codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_codes_reproduce_the_quantised_weight_and_keep_zeros(dtype, bits, symmetric):
    g = torch.Generator().manual_seed(bits + symmetric)
    w = (torch.randn(8, 48, generator=g) * 0.05 + 0.02).to(dtype)  # off-centre, so zero points are not 0
    w[torch.rand(8, 48, generator=g) < 0.5] = 0
    q = RTNQuantizer(RTNConfig(bits=bits, group_size=16, symmetric=symmetric))
    out = q.quantize_weight(w)
    codes = q.codes_for(out)
    assert codes is not None and codes.codes.dtype == torch.int8
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(codes.codes.min()) >= lo and int(codes.codes.max()) <= hi
    # weight = (q - zp) * scale, element by element in the scale's dtype
    for r in range(8):
        for c in range(48):
            s = codes.scale[r, c // 16]
            zp = codes.zero_point[r, c // 16] if codes.zero_point is not None else torch.tensor(0)
            expected = (codes.codes[r, c].to(dtype) - zp.to(dtype)) * s
            assert torch.equal(out[r, c], expected), (r, c)
    assert bool((out[w == 0] == 0).all())
    if not symmetric:
        assert bool((codes.zero_point != 0).any())


def test_codes_for_knows_only_what_it_quantised():
    q = RTNQuantizer(RTNConfig(bits=4, group_size=8))
    w = torch.randn(4, 16)
    out = q.quantize_weight(w)
    assert q.codes_for(w) is None  # never quantised by q
    changed = out.clone()
    changed[0, 0] += 1
    assert q.codes_for(changed) is None
    assert RTNQuantizer(RTNConfig(bits=4, group_size=8)).codes_for(out) is None  # another instance


def test_group_size_not_dividing_in_features_still_quantises_in_memory():
    w = torch.randn(3, 20)
    qc = quantize_codes(w, 8, 8, True)  # groups of 8, 8, 4 (zero-padded)
    assert qc.scale.shape == (3, 3) and qc.codes.shape == (3, 20)
    torch.testing.assert_close(qc.dequantize(), w, atol=float(w.abs().max()) / 127, rtol=0)
