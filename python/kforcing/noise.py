"""Counter-based noise: uniforms that are a pure function of integer keys.

K-Forcing puts all the randomness of sampling into explicit uniforms u (docs/method.md §1). To make a sample a
pure function of (seed, sequence, position), whatever the batch size, the order of the prompts or the decoding
loop (AR or K-Forcing), every uniform is computed from its key with a stateless integer hash instead of being
drawn from a stateful generator:

    u(seed, sequence, position) = top 53 bits of H(seed, sequence, position) / 2^53      in [0, 1), float64

H chains SplitMix64's finaliser (Steele, Lea & Flood 2014) over the three keys. It is implemented with torch
int64 ops (two's-complement wrap-around on multiply, masked arithmetic shifts for the logical shifts), so it runs
on any device and gives bit-identical results on CPU and CUDA; `splitmix64_python` is the same function in
arbitrary-precision Python integers, which the tests compare against.

The same hash also drives the training data sampler (`kforcing.data`), which makes every batch a pure function of
(seed, step, sample index) and so makes resuming exact.
"""

import torch

_MASK64 = (1 << 64) - 1


def _signed(value):
    """A uint64 constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)
# Keys of the three fields, so (seed, sequence, position) = (1, 2, 3) and (2, 1, 3) hash differently.
_FIELD_SEQUENCE = _signed(0xD1B54A32D192ED03)
_FIELD_POSITION = _signed(0x8CB92BA72F3D8DD7)


def _shr(x, bits):
    """Logical right shift of int64 tensors (torch's >> is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x):
    """SplitMix64 of an int64 tensor (bits read as uint64), elementwise; returns int64 with the uint64's bits."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def splitmix64_python(x):
    """The same function as `splitmix64` in Python integers (uint64 in, uint64 out): the specification."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash3(seed, sequence, position):
    """H(seed, sequence, position) as int64 bits; the arguments broadcast (ints or int64 tensors, one at least)."""
    device = next((t.device for t in (seed, sequence, position) if isinstance(t, torch.Tensor)), None)
    seed, sequence, position = (
        t.to(torch.int64) if isinstance(t, torch.Tensor) else torch.tensor(_signed(t & _MASK64), device=device)
        for t in (seed, sequence, position))
    h = splitmix64(seed)
    h = splitmix64(h ^ (sequence + _FIELD_SEQUENCE))
    return splitmix64(h ^ (position + _FIELD_POSITION))


def hash3_python(seed, sequence, position):
    """`hash3` for Python ints, returning the uint64 value."""
    h = splitmix64_python(seed & _MASK64)
    h = splitmix64_python(h ^ ((sequence + 0xD1B54A32D192ED03) & _MASK64))
    return splitmix64_python(h ^ ((position + 0x8CB92BA72F3D8DD7) & _MASK64))


def bits_to_uniform(bits):
    """The top 53 bits of int64 hash values as float64 uniforms in [0, 1)."""
    return _shr(bits, 11).to(torch.float64) * (2.0 ** -53)


def counter_uniform(seed, sequence, position):
    """u(seed, sequence, position) in [0, 1), float64, broadcast over the arguments.

    Args:
        seed: the request's seed (int, or int64 tensor).
        sequence: the sequence index within the request, (B,) int64 tensor or int (see `generate`'s
            `sequence_ids`).
        position: the absolute token position the uniform belongs to (the position of the token it samples).

    The value depends on nothing else: not on the batch, the device or the decoding loop.
    """
    return bits_to_uniform(hash3(seed, sequence, position))


def counter_randint(seed, sequence, position, high):
    """Integers in [0, high) from the same hash (for data sampling); high < 2^53. Bias is below high / 2^53."""
    return torch.floor(counter_uniform(seed, sequence, position) * high).to(torch.int64)


__all__ = ["counter_uniform", "counter_randint", "hash3", "hash3_python", "splitmix64", "splitmix64_python",
           "bits_to_uniform"]
