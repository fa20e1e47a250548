"""RTN codes as an exporter sees them: int8 codes and zero points in the signed range, scales
that are never zero, and ``recover_codes`` finding the exact codes of a quantised weight,
including bf16 products that round onto a neighbouring code."""

import pytest
import torch

from wanda_pipeline.quantizers.rtn import RTNConfig, RTNQuantizer, quantize_codes, recover_codes


def dequant_by_hand(codes, scale, zero, group):
    """weight[r, c] = (q - zp) * scale of c's group, in the scale's dtype."""
    out = torch.empty(codes.shape, dtype=scale.dtype)
    for r in range(codes.shape[0]):
        for c in range(codes.shape[1]):
            zp = zero[r, c // group].to(scale.dtype) if zero is not None else 0
            out[r, c] = (codes[r, c].to(scale.dtype) - zp) * scale[r, c // group]
    return out


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_codes_are_int8_in_range_and_record_their_format(bits, symmetric):
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(bits)) + 0.3
    w[1] = 0  # an all-zero row: its groups have no range
    qc = quantize_codes(w, bits, 8, symmetric)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert qc.codes.dtype == torch.int8 and qc.codes.shape == w.shape
    assert int(qc.codes.min()) >= lo and int(qc.codes.max()) <= hi
    assert qc.bits == bits and qc.group_size == 8
    assert bool((qc.scale > 0).all()), "a zero scale would divide by zero in any consumer"
    assert torch.equal(qc.scale[1], torch.ones(3)), "an all-zero group gets scale 1"
    if symmetric:
        assert qc.zero_point is None
    else:
        assert qc.zero_point.dtype == torch.int8
        assert int(qc.zero_point.min()) >= lo and int(qc.zero_point.max()) <= hi
    assert torch.equal(qc.dequantize(), dequant_by_hand(qc.codes, qc.scale, qc.zero_point, 8))
    assert bool((qc.dequantize()[1] == 0).all())


def grid(scale, zero, dtype=torch.bfloat16):
    """Every code of the 8-bit range, one per column, dequantised under one scale / zero point."""
    codes = torch.arange(-128, 128, dtype=torch.int8).reshape(1, -1)
    s = torch.full((1, 1), scale, dtype=dtype)
    z = None if zero is None else torch.full((1, 1), zero, dtype=torch.int8)
    return codes, s, z, dequant_by_hand(codes, s, z, 256)


@pytest.mark.parametrize("scale,zero", [(1.171875, -128), (1.171875, 127), (1.296875, -128), (0.01, 0),
                                        (0.37, None)])
def test_recover_codes_reproduces_every_representable_weight(scale, zero):
    """bf16 can round (q - zp) * scale so that round(w / scale + zp) misses by one code
    (at 1.171875 with zp -128 or 127 it does, in both directions); a neighbour is then exact."""
    codes, s, z, w = grid(scale, zero)
    got = recover_codes(w, s, z, 256, 8)
    assert got is not None and got.codes.dtype == torch.int8 and got.bits == 8 and got.group_size == 256
    assert torch.equal(got.scale, s) and (z is None or torch.equal(got.zero_point, z))
    assert torch.equal(dequant_by_hand(got.codes, s, z, 256), w)
    # where a value has one code only, that is the code
    unique = torch.tensor([int((w == v).sum()) == 1 for v in w[0]]).reshape(1, -1)
    assert torch.equal(got.codes[unique], codes[unique])


@pytest.mark.parametrize("zero", [0, None, 5])
def test_recover_codes_keeps_the_first_code_that_fits(zero):
    """Collisions (two codes, one value) resolve to the rounded guess, not to a neighbour."""
    codes, s, z, w = grid(1.5, zero)
    got = recover_codes(w, s, z, 256, 8)
    guess = torch.round(w.float() / 1.5 + (zero or 0)).clamp(-128, 127).to(torch.int8)
    fits = dequant_by_hand(guess, s, z, 256) == w
    assert bool(fits.any()) and torch.equal(got.codes[fits], guess[fits])


def test_recover_codes_refuses_a_weight_off_the_grid():
    codes, s, z, w = grid(0.5, 3, torch.float32)
    assert recover_codes(w, s, z, 256, 8) is not None
    w[0, 100] += 0.25  # halfway between two codes
    assert recover_codes(w, s, z, 256, 8) is None
    assert recover_codes(w * 1000, s, z, 256, 8) is None  # far outside the range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, True)])
def test_codes_for_returns_the_quantisers_own_codes(dtype, bits, symmetric):
    w = (torch.randn(6, 24, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.05).to(dtype)
    q = RTNQuantizer(RTNConfig(bits=bits, group_size=16, symmetric=symmetric))
    out = q.quantize_weight(w)
    own = quantize_codes(w, bits, 16, symmetric)
    assert out.dtype == dtype and torch.equal(out, own.dequantize().to(dtype))
    got = q.codes_for(out)
    assert got is not None and got.bits == bits and got.group_size == 16
    assert torch.equal(got.scale, own.scale)
    assert (got.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(got.zero_point, own.zero_point)
    assert torch.equal(got.codes, own.codes)
    assert torch.equal(got.dequantize().to(dtype), out)
    assert q.codes_for(w) is None  # the unquantised weight is not one of its results
