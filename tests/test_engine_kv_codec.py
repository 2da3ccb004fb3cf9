"""Stored KV blocks at 32/16/8/4 bits: exact where promised, bounded error where quantized."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the engine extra (torch) is not installed")

from kvern.engine.kv_codec import (  # noqa: E402
    BlockShape,
    decode,
    encode,
    encoded_bytes,
    from_bytes,
    to_bytes,
)

SHAPE = BlockShape(num_layers=3, num_kv_heads=2, block_tokens=16, head_dim=8)


def _kv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(SHAPE.dims, generator=g)
    keys[..., 3] *= 20.0  # an outlier channel, as real keys have
    return keys, torch.randn(SHAPE.dims, generator=g)


def test_32_bits_gives_back_the_tensors_exactly() -> None:
    keys, values = _kv()
    k, v = decode(encode(keys, values, 32), torch.float32)
    assert torch.equal(k, keys) and torch.equal(v, values)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_quantized_error_is_within_half_a_step(bits: int) -> None:
    keys, values = _kv()
    k, v = decode(encode(keys, values, bits), torch.float32)
    if bits == 16:
        assert torch.allclose(k, keys, rtol=1e-3, atol=1e-3)
        return
    levels = (1 << bits) - 1
    # Keys per channel: the step is that channel's range over the block's tokens.
    key_step = (keys.amax(dim=2, keepdim=True) - keys.amin(dim=2, keepdim=True)) / levels
    value_step = (values.amax(dim=3, keepdim=True) - values.amin(dim=3, keepdim=True)) / levels
    slack = 1e-2  # scale and zero are kept as float16
    assert ((k - keys).abs() <= key_step * (0.5 + slack) + 1e-3).all()
    assert ((v - values).abs() <= value_step * (0.5 + slack) + 1e-3).all()


def test_per_channel_keys_keep_an_outlier_channel_from_costing_the_others() -> None:
    keys, values = _kv()
    k, _ = decode(encode(keys, values, 8), torch.float32)
    plain = [c for c in range(SHAPE.head_dim) if c != 3]
    err = (k[..., plain] - keys[..., plain]).abs().max()
    # One scale over all channels would be ~20x coarser; per channel stays near 1/255 of ~6.
    assert err < 0.05


def test_sizes_shrink_with_bits() -> None:
    sizes = {bits: encoded_bytes(SHAPE, bits) for bits in (32, 16, 8, 4)}
    numel = SHAPE.numel() * 2
    assert sizes[32] == numel * 4 and sizes[16] == numel * 2
    assert sizes[32] > sizes[16] > sizes[8] > sizes[4]
    assert sizes[4] < numel  # under a byte a number, scales included


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_bytes_round_trip_is_exact(bits: int) -> None:
    keys, values = _kv(1)
    block = encode(keys, values, bits)
    data = to_bytes(block)
    assert len(data) == encoded_bytes(SHAPE, bits)
    again = from_bytes(data, SHAPE, bits)
    a, b = decode(block, torch.float32), decode(again, torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_wrong_size_is_refused() -> None:
    keys, values = _kv()
    with pytest.raises(ValueError, match="expected"):
        from_bytes(to_bytes(encode(keys, values, 8))[:-1], SHAPE, 8)


def test_16_bits_keeps_a_bfloat16_models_kv_exactly() -> None:
    keys, values = (t.to(torch.bfloat16) for t in _kv(2))
    block = encode(keys, values, 16)
    k, v = decode(from_bytes(to_bytes(block), SHAPE, 16, torch.bfloat16), torch.bfloat16)
    assert torch.equal(k, keys) and torch.equal(v, values)
    assert encoded_bytes(SHAPE, 16, torch.bfloat16) == block.num_bytes
