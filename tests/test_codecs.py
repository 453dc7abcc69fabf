"""State codecs: round trips, packing, batched == per-tensor, fresh state is zero."""

from __future__ import annotations

import math

import pytest
import torch

from kaon.state.codecs import (
    FloatCodec,
    FourBitCodec,
    Int8Codec,
    LogSpace4BitCodec,
    LogSpace8BitCodec,
    momentum_codec,
)

CODECS = [FloatCodec(torch.float32), FloatCodec(torch.bfloat16), Int8Codec(), FourBitCodec(128),
          FourBitCodec(64), FourBitCodec(0), LogSpace8BitCodec(256), LogSpace8BitCodec(128),
          LogSpace4BitCodec(256), LogSpace4BitCodec(64)]
SHAPES = [(1,), (7,), (129,), (300,), (5, 3), (16, 40), (33, 17), (4, 27)]


def sample(shape, codec, seed=0):
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(seed))
    x = x * torch.logspace(-4, 0, 3).view(3, *([1] * len(shape)))
    if isinstance(codec, LogSpace8BitCodec):
        x = x.square()
        x.view(3, -1)[:, ::5] = 0.0
    return x


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fresh_state_decodes_to_exact_zero(codec, shape):
    stored = {k: v.unsqueeze(0) for k, v in codec.init(shape, torch.device("cpu")).items()}
    decoded = codec.decode(stored, shape)
    assert decoded.shape == (1, *shape) and decoded.dtype == torch.float32
    assert torch.equal(decoded, torch.zeros_like(decoded))


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batched_encode_decode_equals_per_tensor(codec, shape):
    x = sample(shape, codec)
    batched = codec.encode(x.clone())
    fresh = codec.init(shape, torch.device("cpu"))
    for suffix, tensor in batched.items():
        assert tensor.shape[1:] == fresh[suffix].shape and tensor.dtype == fresh[suffix].dtype
    for i in range(x.shape[0]):
        single = codec.encode(x[i : i + 1].clone())
        for suffix in batched:
            assert torch.equal(single[suffix][0], batched[suffix][i])
        assert torch.equal(codec.decode(single, shape)[0], codec.decode(batched, shape)[i])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_round_trip_within_half_a_step(shape):
    codec = Int8Codec()
    x = sample(shape, codec)
    stored = codec.encode(x.clone())
    assert stored[""].dtype == torch.int8
    assert stored[""].min() >= -127 and stored[""].max() <= 127
    error = (codec.decode(stored, shape) - x).abs()
    assert (error <= stored["_scale"] / 2 * (1 + 1e-6)).all()
    if len(shape) >= 2:  # one scale per row
        assert stored["_scale"].shape == (3, shape[0], 1)


@pytest.mark.parametrize("block", [128, 64, 0])
@pytest.mark.parametrize("numel", [1, 2, 3, 64, 127, 128, 129, 1000])
def test_4bit_round_trip_and_packing(block, numel):
    codec = FourBitCodec(block)
    x = torch.randn(2, numel, generator=torch.Generator().manual_seed(numel))
    stored = codec.encode(x.clone())
    assert stored[""].dtype == torch.uint8 and stored[""].shape == (2, (numel + 1) // 2)
    nibbles = torch.stack((stored[""] & 15, stored[""] >> 4), -1).view(2, -1)[:, :numel]
    assert nibbles.min() >= 1 and nibbles.max() <= 15
    size = numel if block <= 0 else min(block, numel)
    blocks = math.ceil(numel / size)
    assert stored["_scale"].shape == (2, blocks)
    scale = stored["_scale"].repeat_interleave(size, dim=1)[:, :numel]
    error = (codec.decode(stored, (numel,)) - x).abs()
    assert (error <= scale / 2 * (1 + 1e-6)).all()


def test_4bit_nibble_order_is_low_then_high():
    codec = FourBitCodec(128)
    x = torch.tensor([[7.0, -7.0, 0.0]])  # absmax 7 -> scale 1 -> levels 7, -7, 0
    packed = codec.encode(x)[""]
    assert packed.tolist() == [[(7 + 8) | ((-7 + 8) << 4), 8]]


def test_log8_relative_error_depends_on_block_range_and_zero_is_exact():
    codec = LogSpace8BitCodec(256)
    exponents = torch.linspace(-40, 0, 256)
    x = torch.exp2(exponents).unsqueeze(0).clone()
    x[0, 10] = 0.0
    stored = codec.encode(x.clone())
    decoded = codec.decode(stored, (256,))
    assert decoded[0, 10] == 0.0 and stored[""][0, 10] == 0
    nonzero = x[0] > 0
    relative = (decoded[0, nonzero] / x[0, nonzero] - 1).abs()
    bound = 2 ** (40 / 254 / 2) - 1  # half a log2 step over a 2^40 range
    assert relative.max() <= bound * 1.01
    assert (stored[""][0, nonzero] >= 1).all()
    # a narrow range is far more precise than a fixed floor would allow
    narrow = torch.linspace(1.0, 2.0, 256).unsqueeze(0)
    rel = (codec.decode(codec.encode(narrow.clone()), (256,)) / narrow - 1).abs().max()
    assert rel < 2 ** (1 / 254 / 2) - 1 + 1e-6


def test_log4_relative_error_packing_and_zero_is_exact():
    codec = LogSpace4BitCodec(256)
    exponents = torch.linspace(-20, 0, 255)  # odd length: one padding nibble
    x = torch.exp2(exponents).unsqueeze(0).clone()
    x[0, 10] = 0.0
    stored = codec.encode(x.clone())
    assert stored[""].dtype == torch.uint8 and stored[""].shape == (1, 128)
    decoded = codec.decode(stored, (255,))
    assert decoded[0, 10] == 0.0
    nonzero = x[0] > 0
    assert (decoded[0, nonzero] > 0).all()  # a small non-zero value never becomes zero
    relative = (decoded[0, nonzero] / x[0, nonzero] - 1).abs()
    bound = 2 ** (20 / 14 / 2) - 1  # half a log2 step over a 2^20 range
    assert relative.max() <= bound * 1.01
    # nibble order: element 0 low, element 1 high
    codes = torch.stack((stored[""][0] & 0x0F, stored[""][0] >> 4), dim=-1).flatten()
    assert codes[0] == 1 and codes[254] == 15 and codes[10] == 0 and codes[255] == 0


def test_momentum_codec_dispatch_and_errors():
    assert isinstance(momentum_codec("int8"), Int8Codec)
    assert momentum_codec("4bit", 64).block == 64
    assert momentum_codec("bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="momentum_dtype"):
        momentum_codec("fp8")


def test_integer_codec_keeps_int64_values_exactly():
    from kaon.state.codecs import IntegerCodec

    codec = IntegerCodec()
    fresh = codec.init((), torch.device("cpu"))[""]
    assert fresh.dtype == torch.int64 and int(fresh) == 0
    big = torch.tensor([2**62 + 12345, 7], dtype=torch.int64)
    stored = codec.encode(big)
    assert torch.equal(codec.decode(stored, ()), big)
    assert torch.equal(codec.encode(torch.tensor([3.0, 16777215.0]))[""],
                       torch.tensor([3, 16777215]))
