"""pipeline/cache/quantize.py: the int8 and float8 schemes for stored features, and their error statistics."""

from __future__ import annotations

import pytest
import torch

from layerfuse.core.errors import InputError
from layerfuse.pipeline.cache.quantize import (
    FP8_DTYPE,
    FP8_MAX,
    SCHEMES,
    ChannelInt8,
    ErrorStats,
    Float8,
    QuantizeError,
    TokenInt8,
    TokenOutlierInt8,
    calibrate,
    layer_errors,
    parts_bytes,
)

B, K, T, D = 4, 3, 5, 32
OUTLIER_CHANNELS = (3, 17)


def features(seed: int = 0, b: int = B) -> torch.Tensor:
    """[b, K, T, D] float32 activations with two outlier channels (as trained encoders have) and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, K, T, D, generator=g)
    x[..., OUTLIER_CHANNELS[0]] *= 40
    x[..., OUTLIER_CHANNELS[1]] -= 25
    x[-1] = 0  # a text-only sample: all zeros
    return x


def schemes(x: torch.Tensor) -> dict[str, object]:
    return {name: calibrate(name, x) for name in SCHEMES}


EXPECTED_PARTS = {  # name -> {part: (shape, dtype)}; n = the outlier channels found
    "channel": {"q": ((B, K, T, D), torch.int8)},
    "token": {"q": ((B, K, T, D), torch.int8), "scale": ((B, K, T), torch.float16)},
    "token+outliers": {"q": ((B, K, T, D), torch.int8), "scale": ((B, K, T), torch.float16), "outliers": ((B, K, T, 2), torch.float16)},
    "fp8": {"q": ((B, K, T, D), FP8_DTYPE)},
    "fp8+token": {"q": ((B, K, T, D), FP8_DTYPE), "scale": ((B, K, T), torch.float16)},
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_parts_shapes_dtypes_and_round_trip(name):
    x = features()
    scheme = calibrate(name, x)
    parts = scheme.quantize(x)
    assert {p: (tuple(t.shape), t.dtype) for p, t in parts.items()} == EXPECTED_PARTS[name]
    y = scheme.dequantize(parts, torch.float16)
    assert y.shape == x.shape and y.dtype == torch.float16
    err = layer_errors(scheme, x[:-1])
    assert len(err) == K and all(e.rel_rms < 0.05 and e.cosine > 0.998 and e.clip_rate == 0 for e in err), err
    assert parts_bytes(parts) == sum(t.numel() * t.element_size() for t in parts.values())


@pytest.mark.parametrize("name", list(SCHEMES))
def test_zero_rows_come_back_as_exact_zeros(name):
    x = features()
    scheme = calibrate(name, x)
    zeros = torch.zeros(2, K, T, D)
    y = scheme.dequantize(scheme.quantize(zeros))
    assert torch.equal(y, zeros)
    assert torch.equal(scheme.dequantize(scheme.quantize(x))[-1], torch.zeros(K, T, D))
    (e,) = layer_errors(scheme, zeros[:, :1].expand(2, K, T, D).contiguous())[:1]
    assert e.rel_rms == 0 and e.max_abs == 0 and e.cosine == 1 and e.clip_rate == 0


@pytest.mark.parametrize("name", list(SCHEMES))
def test_samples_are_quantised_independently(name):
    x = features()
    scheme = calibrate(name, x)
    whole = scheme.quantize(x)
    for i in range(B):
        one = scheme.quantize(x[i : i + 1])
        for part, t in whole.items():
            assert torch.equal(t[i : i + 1].view(torch.uint8) if t.dtype == FP8_DTYPE else t[i : i + 1],
                               one[part].view(torch.uint8) if t.dtype == FP8_DTYPE else one[part]), (name, part, i)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_state_restores_the_scheme(name):
    x = features()
    scheme = calibrate(name, x)
    again = SCHEMES[name].from_state({k: v.clone() for k, v in scheme.state().items()})
    parts = scheme.quantize(x)
    assert torch.equal(again.dequantize(parts), scheme.dequantize(parts))


def test_token_int8_error_is_at_most_half_a_step():
    x = features()
    parts = TokenInt8().quantize(x)
    q, scale = parts["q"], parts["scale"].float()
    assert q.abs().max() == 127 and int(q.min()) >= -127
    assert torch.equal(q.abs().amax(-1)[:-1], torch.full((B - 1, K, T), 127, dtype=torch.int8))  # every live token uses the range
    err = (x - TokenInt8().dequantize(parts)).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-6)).all()
    assert (scale[:-1] * 127 >= x[:-1].abs().amax(-1)).all()  # rounded up: nothing clips


def test_scales_survive_float16_extremes():
    x = torch.zeros(1, 1, 3, D)
    x[0, 0, 0] = torch.linspace(-1e-6, 1e-6, D)  # absmax / 127 is below float16's normal range
    x[0, 0, 1] = torch.linspace(-4e7, 4e7, D)  # absmax / 127 (and / 448) is beyond float16's maximum
    x[0, 0, 2, 0] = 1.0
    for scheme in (TokenInt8(), SCHEMES["fp8+token"]()):
        y = scheme.dequantize(scheme.quantize(x))
        assert torch.isfinite(y).all()
        assert (y[0, 0, 0] - x[0, 0, 0]).abs().max() < 0.05e-6  # tiny tokens keep their shape
        assert torch.equal(scheme.clipped(x)[0, 0, 0], torch.zeros(D, dtype=torch.bool))
        assert scheme.clipped(x)[0, 0, 1].any()  # the huge token clips (its scale is capped at the float16 max)
        assert y[0, 0, 2, 0] == pytest.approx(1.0, abs=1 / 127 / 2)  # within half a step of the rounded-up scale


def test_channel_scheme_clips_beyond_calibration_and_counts_it():
    cal = features(0)
    scheme = ChannelInt8.calibrate(cal)
    assert scheme.state()["scale"].shape == (K, D) and scheme.state()["scale"].dtype == torch.float32
    x = features(1)
    x[0, 1, 2, 5] = 3 * cal[:, 1, :, 5].abs().max()  # beyond the calibrated range
    clipped = scheme.clipped(x)
    assert clipped[0, 1, 2, 5]
    y = scheme.dequantize(scheme.quantize(x))
    assert torch.allclose(y[0, 1, 2, 5], 127 * scheme.scale[1, 5])
    stats = ErrorStats(K)
    stats.update(x, y, clipped)
    err = stats.per_layer()
    assert err[1].clip_rate >= 1 / (B * T * D) and err[1].max_abs >= float(2 * cal[:, 1, :, 5].abs().max()) * 0.99
    with pytest.raises(QuantizeError, match="calibrated for"):
        scheme.quantize(torch.zeros(1, K, T, D + 1))


def test_outlier_channels_are_found_and_kept_exactly():
    x = features()
    scheme = TokenOutlierInt8.calibrate(x, factor=3.0, max_outliers=8)
    assert scheme.channels.tolist() == [list(OUTLIER_CHANNELS)] * K
    parts = scheme.quantize(x)
    assert (parts["q"][..., list(OUTLIER_CHANNELS)] == 0).all()
    assert torch.equal(parts["outliers"], x[..., list(OUTLIER_CHANNELS)].half())
    y = scheme.dequantize(parts)
    assert torch.equal(y[..., list(OUTLIER_CHANNELS)], x[..., list(OUTLIER_CHANNELS)].half().float())
    inner = [c for c in range(D) if c not in OUTLIER_CHANNELS]
    token = TokenInt8()
    err_outliers = (y[..., inner] - x[..., inner]).norm()
    err_token = (token.dequantize(token.quantize(x))[..., inner] - x[..., inner]).norm()
    assert err_outliers < err_token / 5  # the outliers no longer set the scale of every other channel
    assert TokenOutlierInt8.calibrate(x, factor=3.0, max_outliers=1).channels.shape == (K, 1)  # capped: the largest
    assert TokenOutlierInt8.calibrate(x, factor=3.0, max_outliers=1).channels.tolist() == [[3]] * K
    plain = TokenOutlierInt8.calibrate(torch.randn(2, K, T, D), factor=50.0)
    assert plain.channels.shape == (K, 0)  # no outliers: the token scheme with an empty outlier part
    assert torch.equal(plain.quantize(x)["q"], token.quantize(x)["q"])


def test_fp8_saturates_and_fp8_token_does_not():
    x = torch.zeros(1, 1, 2, D)
    x[0, 0, 0] = torch.linspace(-1000, 1000, D)
    x[0, 0, 1] = torch.linspace(-9e-4, 9e-4, D)  # below half float8_e4m3fn's smallest subnormal (2^-9)
    direct, scaled = Float8(), SCHEMES["fp8+token"]()
    y = direct.dequantize(direct.quantize(x))
    assert y.abs().max() == FP8_MAX and direct.clipped(x)[0, 0, 0].sum() == (x[0, 0, 0].abs() > FP8_MAX).sum()
    assert (y[0, 0, 1] == 0).all()  # flushed
    z = scaled.dequantize(scaled.quantize(x))
    assert not scaled.clipped(x).any()
    assert ((z - x).abs() <= x.abs() * 2**-4 + 1e-12).all()  # e4m3: 3 mantissa bits, relative error <= 2^-4


def test_error_stats_values_and_accumulation():
    x = torch.ones(2, 2, 3, 4)
    x[1, :, 2] = 0  # zero tokens do not count in the cosine
    y = x * 0.9
    y[0, 1, 0, 0] = -1.0
    stats = ErrorStats(2)
    stats.update(x, y, torch.zeros_like(x, dtype=torch.bool))
    e0, e1 = stats.per_layer()
    assert e0.rel_rms == pytest.approx(0.1) and e0.max_abs == pytest.approx(0.1) and e0.cosine == pytest.approx(1.0)
    assert e1.max_abs == pytest.approx(2.0) and e1.cosine < 1 and e0.clip_rate == 0
    halves = ErrorStats(2)
    halves.update(x[:1], y[:1])
    halves.update(x[1:], y[1:])
    flat = lambda s: [v for e in s.per_layer() for v in e.as_dict().values()]  # noqa: E731
    assert flat(halves) == pytest.approx(flat(stats))


def test_bad_input_is_a_quantize_error():
    assert issubclass(QuantizeError, InputError)
    with pytest.raises(QuantizeError, match="unknown quantisation scheme"):
        calibrate("int4", features())
    with pytest.raises(QuantizeError, match=r"\[B, K, T, D\]"):
        TokenInt8().quantize(torch.zeros(K, T, D))
    bad = features()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantizeError, match="non-finite"):
        TokenInt8().quantize(bad)
    with pytest.raises(QuantizeError, match="part 'scale' missing"):
        TokenInt8().dequantize({"q": torch.zeros(1, K, T, D, dtype=torch.int8)})


def _edge_features() -> torch.Tensor:
    """features() plus the tokens where the fast paths must agree with the definitions: a token beyond the float16
    scale range (int8 clips it), a token too small for a nonzero float16 scale, a -0.0 token, an outlier channel value
    beyond float16."""
    x = features(seed=5)
    x[0, 0, 0] *= 1e6  # absmax / 127 > 65504: the scale is capped, values clip
    x[0, 1, 1] = 1e-44  # absmax / 127 underflows: scale 0
    x[1, 2, 2] = -0.0
    x[2, 1, 3, OUTLIER_CHANNELS[0]] = 9e4  # beyond float16 in an outlier channel
    return x


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_layer_alone_is_quantised_as_in_the_block(name):
    x = _edge_features()
    scheme = calibrate(name, features())
    whole = scheme.quantize(x)
    for k in range(K):
        alone = scheme.layer(k).quantize(x[:, k : k + 1])
        assert alone.keys() == whole.keys()
        assert all(_bits(alone[p]) == _bits(whole[p][:, k : k + 1]) for p in whole), (name, k)
        back = scheme.layer(k).dequantize(alone)
        assert torch.equal(back, scheme.dequantize(whole)[:, k : k + 1])


@pytest.mark.parametrize("name", list(SCHEMES))
def test_clip_counts_are_the_clipped_values(name):
    scheme = calibrate(name, features())
    for x in (features(seed=2), _edge_features()):
        counts = scheme.clip_counts(x, scheme.quantize(x))
        assert counts.dtype == torch.int64 and torch.equal(counts, scheme.clipped(x).sum(dim=(0, 2, 3)))
    if name in ("token", "token+outliers"):  # the capped token and the outlier beyond float16 are counted
        x = _edge_features()
        assert int(scheme.clip_counts(x, scheme.quantize(x)).sum()) > 0


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantize_and_dequantize_leave_their_inputs_alone(name):
    x = _edge_features()
    scheme = calibrate(name, features())
    before = x.clone()
    parts = scheme.quantize(x)
    assert torch.equal(x, before)
    kept = {p: t.clone() for p, t in parts.items()}
    scheme.dequantize(parts)
    scheme.dequantize(parts, torch.float16)
    assert all(_bits(parts[p]) == _bits(kept[p]) for p in parts)


def test_error_stats_of_each_layer_alone_are_the_block_stats():
    x = _edge_features()
    scheme = calibrate("token+outliers", features())
    x_hat, clipped = scheme.dequantize(scheme.quantize(x)), scheme.clipped(x)
    block, layers = ErrorStats(K), ErrorStats(K)
    block.update(x, x_hat, clipped)
    tensors = ErrorStats(K)  # clip counts as tensors (what encoding passes, so that no count waits for the device)
    for k in range(K):
        layers.update_layer(k, x[:, k], x_hat[:, k], int(clipped[:, k].sum()))
        tensors.update_layer(k, x[:, k], x_hat[:, k], clipped[:, k].sum())
    for name, values in block.to_json().items():  # the float16 overflow of the outlier makes some sums nan
        for other in (layers, tensors):
            assert torch.equal(torch.tensor(values).nan_to_num(7.0), torch.tensor(other.to_json()[name]).nan_to_num(7.0)), name
    assert tensors.host() is tensors  # on the CPU already
    with pytest.raises(QuantizeError, match="layer 3 of 3"):
        layers.update_layer(3, x[:, 0], x_hat[:, 0])


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_layers_error_is_added_without_waiting_for_its_device(name):
    """Extraction on a GPU adds each stored layer's error where the layer is: a host sync there (a float(), int() or
    bool() of a device tensor) would stall the GPU once per layer. The meta device has shapes and no values, so any
    such read fails on it: clip counts and error sums must run there as tensor ops, the sums kept on that device."""
    x = _edge_features()
    scheme = calibrate(name, features())
    parts = {p: t.to("meta") for p, t in scheme.quantize(x).items()}
    xm = x.to("meta")
    counts = scheme.clip_counts(xm, parts)  # the int8 token schemes' CPU shortcut tests the scales on the host
    assert counts.device.type == "meta" and counts.shape == (K,)
    x_hat = scheme.dequantize(parts)
    stats = ErrorStats(K, xm.device)
    for k in range(K):
        stats.update_layer(k, xm[:, k], x_hat[:, k], counts[k])
    assert all(getattr(stats, f).device.type == "meta" for f in ErrorStats.FIELDS)
