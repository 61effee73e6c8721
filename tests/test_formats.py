"""fastoptim.formats, the specification of the compressed state formats: the 8-bit
blockwise codec against a brute-force nearest-code search and against bitsandbytes
(where it is installed), and its rules for zero and non-finite blocks."""
import numpy as np
import pytest

from fastoptim import formats as FM


def _bnb():
    try:
        import bitsandbytes.functional as BF
    except Exception as e:                      # noqa: BLE001 - any reason to be absent
        pytest.skip(f"bitsandbytes is not importable here ({type(e).__name__}: {e}); "
                    "the comparison with it did not run")
    return BF


def _brute_force(x, signed, block=FM.BLOCK):
    """Codes by trying every map value: nearest to x/absmax (float32 quotient), exact
    distances, ties to the smaller value."""
    code = FM.dynamic_map(signed).astype(np.float64)
    flat = np.ravel(x, order="K")
    out = np.empty(flat.size, np.uint8)
    for start in range(0, flat.size, block):
        b = flat[start:start + block]
        absmax = np.float32(np.max(np.abs(b)))
        if not (np.isfinite(absmax) and absmax > 0):
            out[start:start + block] = int(np.flatnonzero(code == 0)[0])
            continue
        normed = (b / absmax).astype(np.float32).astype(np.float64)
        dist = np.abs(normed[:, None] - code[None, :])
        out[start:start + block] = np.argmin(dist, axis=1)   # (first = smaller on ties)
    return out


@pytest.mark.parametrize("signed", [True, False])
def test_the_maps_are_bitsandbytes(signed):
    BF = _bnb()
    want = BF.create_dynamic_map(signed=signed).numpy()
    got = FM.dynamic_map(signed)
    assert got.dtype == np.float32 and got.shape == (256,)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not got.flags.writeable


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,order", [((1000,), "C"), ((33, 17), "F"), ((7,), "C"),
                                         ((256,), "C"), ((0,), "C"), ((), "C")])
def test_codes_are_the_nearest_map_values(signed, shape, order):
    rng = np.random.default_rng(5)
    scales = np.float32(10.0) ** rng.uniform(-9, 2, size=shape)
    x = np.asarray(rng.standard_normal(shape) * scales, np.float32, order=order)
    if not signed:
        x = np.abs(x)
    codes, absmax = FM.quantize_blockwise(x, signed)
    assert codes.shape == x.shape and codes.dtype == np.uint8
    assert codes.flags.f_contiguous == (order == "F" and x.ndim > 1) or x.ndim < 2
    assert absmax.shape == (-(-x.size // FM.BLOCK),) and absmax.dtype == np.float32
    np.testing.assert_array_equal(np.ravel(codes, order="K"), _brute_force(x, signed))
    back = FM.dequantize_blockwise(codes, absmax, signed)
    assert back.shape == x.shape
    # a block's largest magnitude comes back exactly where it is positive (both maps
    # hold 1.0; the signed one's most negative value is -0.99296875, not -1)
    flat, fb = np.ravel(x, order="K"), np.ravel(back, order="K")
    for k in range(absmax.size):
        j = k * FM.BLOCK + int(np.argmax(np.abs(flat[k * FM.BLOCK:(k + 1) * FM.BLOCK])))
        if flat[j] > 0:
            assert fb[j] == flat[j]


def test_ties_go_to_the_smaller_value_and_exact_values_keep_their_code():
    code = FM.dynamic_map(True)
    x = np.array([1.0] + list(code[100:110]), np.float32)        # absmax 1: x/1 = x
    codes, absmax = FM.quantize_blockwise(x)
    assert absmax.tolist() == [1.0]
    assert codes.tolist() == [255] + list(range(100, 110))
    mid = np.float32((np.float64(code[120]) + np.float64(code[121])) / 2)
    if (np.float64(mid) - code[120]) == (code[121] - np.float64(mid)):   # an exact tie
        assert FM.quantize_blockwise(np.array([1.0, mid], np.float32))[0][1] == 120


def test_zero_and_non_finite_blocks():
    x = np.zeros(3 * FM.BLOCK, np.float32)
    x[FM.BLOCK + 3] = np.nan
    x[2 * FM.BLOCK:] = 1.0
    x[2 * FM.BLOCK + 7] = -np.inf
    codes, absmax = FM.quantize_blockwise(x)
    zero = int(np.flatnonzero(FM.dynamic_map(True) == 0)[0])
    assert absmax[0] == 0 and np.isnan(absmax[1]) and absmax[2] == np.inf
    assert (codes[:2 * FM.BLOCK] == zero).all() and (codes[2 * FM.BLOCK:] == zero).all()
    back = FM.dequantize_blockwise(codes, absmax)
    assert (back[:FM.BLOCK] == 0).all()
    assert np.isnan(back[FM.BLOCK:]).all()                 # 0 * NaN, 0 * Inf: NaN
    with pytest.raises(TypeError, match="float32"):
        FM.quantize_blockwise(x.astype(np.float64))
    with pytest.raises(ValueError, match="one per block"):
        FM.dequantize_blockwise(codes, absmax[:2])
    with pytest.raises(TypeError, match="uint8"):
        FM.dequantize_blockwise(codes.astype(np.int8), absmax)


@pytest.mark.parametrize("signed", [True, False])
def test_against_bitsandbytes_blockwise_codec(signed):
    """bitsandbytes' CPU quantize_blockwise (block 256) finds the same scales; its codes
    are ours except where its 65,536-bin lookup table picks a farther value (never
    nearer than ours, and farther by less than a bin); its dequantization of our codes
    is ours, bit for bit."""
    BF = _bnb()
    import torch
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(50_000) * np.float32(10.0) ** rng.uniform(-6, 1, 50_000))
    x = np.asarray(np.abs(x) if not signed else x, np.float32)
    codes, absmax = FM.quantize_blockwise(x, signed)
    code_t = BF.create_dynamic_map(signed=signed)
    q, st = BF.quantize_blockwise(torch.from_numpy(x), code=code_t, blocksize=FM.BLOCK)
    np.testing.assert_array_equal(st.absmax.numpy(), absmax)
    theirs = q.numpy()
    m = FM.dynamic_map(signed).astype(np.float64)
    normed = (x / np.repeat(absmax, FM.BLOCK)[:x.size]).astype(np.float32).astype(np.float64)
    ours_d, theirs_d = np.abs(m[codes] - normed), np.abs(m[theirs] - normed)
    assert (ours_d <= theirs_d).all()
    # where they differ, theirs is farther by less than one bin of their table
    assert (theirs_d - ours_d <= 2.0 / 65536).all()
    st.absmax = torch.from_numpy(absmax)
    back = BF.dequantize_blockwise(torch.from_numpy(codes), st).numpy()
    np.testing.assert_array_equal(back, FM.dequantize_blockwise(codes, absmax, signed))
