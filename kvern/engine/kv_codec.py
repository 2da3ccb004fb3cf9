"""One block's KV tensors, stored at 32, 16, 8 or 4 bits a number.

Why KIVI's split: keys have a few channels with large magnitudes that stay
large across tokens, so a key block is quantized per channel (one scale and
zero point per layer, head and channel, over the block's tokens); values have
no such channels and are used as a weighted sum over tokens, so a value block
is quantized per token (one scale and zero point per layer, head and token,
over the channels). Both are asymmetric min/max quantizers; 4-bit codes are
packed two to a byte. 16 bits is float16, 32 the model's float32 as computed.

A block's KV is ``keys`` and ``values`` shaped ``[layers, kv_heads, tokens,
head_dim]``; what :func:`encode` returns is opaque to the store apart from
its size in bytes (:attr:`EncodedBlock.num_bytes`) and the flat byte form
the disk tier writes (:func:`to_bytes`, :func:`from_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KvBits = Literal[32, 16, 8, 4]
KV_BITS: tuple[KvBits, ...] = (32, 16, 8, 4)


@dataclass(slots=True, frozen=True)
class BlockShape:
    """The shape of one block's keys (and values): what every stored block shares."""

    num_layers: int
    num_kv_heads: int
    block_tokens: int
    head_dim: int

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.block_tokens, self.head_dim)

    def numel(self) -> int:
        return self.num_layers * self.num_kv_heads * self.block_tokens * self.head_dim


@dataclass(slots=True)
class EncodedBlock:
    """One block's keys and values in storage form: each a list of tensors."""

    bits: KvBits
    # float tensors (32/16 bits) or [codes, scale, zero] for 8/4 bits.
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_bytes(self) -> int:
        """Bytes the block's tensors occupy (what the store's budget counts)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _quantize(x: torch.Tensor, bits: int, dim: int) -> list[torch.Tensor]:
    """Asymmetric min/max codes of ``x`` reduced over ``dim``: [codes, scale, zero].

    Scale and zero are kept as float16 (they are a quarter of a short
    block's bytes at float32), and the codes are computed against those
    rounded values, so what decodes is within half a step of ``x``: the
    zero is rounded down and the scale up, so the range is still covered.
    """
    levels = (1 << bits) - 1
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    zero = low.to(torch.float16)
    below = zero.float() > low
    zero = torch.where(below, torch.nextafter(zero, torch.full_like(zero, -torch.inf)), zero)
    scale = ((high - zero.float()) / levels).clamp_min(1e-6).to(torch.float16)
    short = scale.float() * levels + zero.float() < high
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = _pack4(codes)
    return [codes, scale, zero]


def _dequantize(parts: list[torch.Tensor], bits: int, dtype: torch.dtype) -> torch.Tensor:
    codes, scale, zero = parts
    if bits == 4:
        codes = _unpack4(codes)
    return codes.to(dtype) * scale.to(dtype) + zero.to(dtype)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte along the last dimension (which must be even)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def encode(keys: torch.Tensor, values: torch.Tensor, bits: KvBits) -> EncodedBlock:
    """Store one block: ``keys``/``values`` shaped ``[layers, heads, tokens, head_dim]``.

    32 bits keeps float32 as it is; 16 keeps a 16-bit model's own dtype
    (exact) and turns float32 into float16.
    """
    if bits == 32:
        return EncodedBlock(
            bits, [keys.to(torch.float32).clone()], [values.to(torch.float32).clone()]
        )
    if bits == 16:
        half = keys.dtype if keys.dtype in (torch.float16, torch.bfloat16) else torch.float16
        return EncodedBlock(bits, [keys.to(half).clone()], [values.to(half).clone()])
    if bits not in (8, 4):
        raise ValueError(f"kv_bits must be one of {KV_BITS}, got {bits!r}")
    if bits == 4 and keys.shape[-1] % 2:
        raise ValueError(f"kv_bits 4 needs an even head_dim, got {keys.shape[-1]}")
    # Keys per channel: reduce over tokens (dim 2); values per token: over channels (dim 3).
    return EncodedBlock(bits, _quantize(keys.float(), bits, 2), _quantize(values.float(), bits, 3))


def decode(block: EncodedBlock, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's keys and values as ``dtype`` tensors, ``[layers, heads, tokens, head_dim]``."""
    if block.bits in (32, 16):
        return block.keys[0].to(dtype), block.values[0].to(dtype)
    return _dequantize(block.keys, block.bits, dtype), _dequantize(block.values, block.bits, dtype)


def encoded_bytes(shape: BlockShape, bits: KvBits, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one block of ``shape`` computed in ``dtype`` takes at ``bits`` (the disk slot size)."""
    zeros = torch.zeros(shape.dims, dtype=dtype)
    return encode(zeros, zeros, bits).num_bytes


def to_bytes(block: EncodedBlock) -> bytes:
    """The block's tensors back to back (shapes and dtypes follow from the shape and bits)."""
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in _parts(block))


def from_bytes(
    data: bytes, shape: BlockShape, bits: KvBits, dtype: torch.dtype = torch.float32
) -> EncodedBlock:
    """What :func:`to_bytes` wrote, for a block of ``shape`` computed in ``dtype``, at ``bits``."""
    zeros = torch.zeros(shape.dims, dtype=dtype)
    template = encode(zeros, zeros, bits)
    if len(data) != template.num_bytes:
        raise ValueError(f"a stored block of {len(data)} bytes, expected {template.num_bytes}")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out: list[torch.Tensor] = []
    offset = 0
    for t in _parts(template):
        size = t.numel() * t.element_size()
        out.append(flat[offset : offset + size].view(t.dtype).reshape(t.shape))
        offset += size
    half = len(template.keys)
    return EncodedBlock(bits, out[:half], out[half:])


def _parts(block: EncodedBlock) -> list[torch.Tensor]:
    return [*block.keys, *block.values]
