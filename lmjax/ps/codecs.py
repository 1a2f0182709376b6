"""Push compression: codecs for gradients, and error feedback.

A codec turns one parameter's gradient (float32, flattened to `size` entries) into a
payload, a tuple of compact numpy arrays, and back. The payload is what travels: the
in-process transport hands it to the server as is, the key-value transport writes its
arrays' bytes one after the other (`Codec.layout` gives every array's dtype and length
from the size alone, so no header travels), and `payload_bytes` is what `pushed_bytes`
counts.

| codec | payload (n entries, k = ceil(fraction * n)) | bytes | decode |
|---|---|---|---|
| none | float32[n] | 4n | exact |
| bf16 | uint16[n]: bfloat16 bits, rounded to nearest | 2n | relative error <= 2^-8 |
| topk | int32[k] indices of the largest magnitudes, float32[k] | 8k | kept entries exact |
| randk | int32[k] uniform indices, float32[k] values * n / k | 8k | unbiased |
| sign | float32[1] scale mean(abs), uint8[ceil(n/8)] sign bits | n/8 + 4 | scale * sign |
| qsgd | float32[1] L2 norm, int8/int16[n] signed levels | n or 2n, + 4 | unbiased |

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the worker adds what the
codec dropped from its previous pushes to the next gradient before encoding, so every
entry eventually travels: corrected = grad + residual, sent = decode(encode(corrected)),
residual = corrected - sent.
"""

import abc
import math

import ml_dtypes
import numpy as np

from lmjax.ps.config import PSConfig
from lmjax.registry import Registry

Payload = tuple[np.ndarray, ...]
Layout = tuple[tuple[np.dtype, int], ...]


class Codec(abc.ABC):
    """encode(flat float32 gradient, rng) -> payload; decode(payload, size) -> flat float32.

    `randomized` codecs draw from the rng they are given; the others ignore it."""

    randomized = False

    def __init__(self, config: PSConfig | None = None):
        """Codecs with settings (topk, randk, qsgd) read them from the config."""
        self.config = config

    @abc.abstractmethod
    def layout(self, size: int) -> Layout:
        """(dtype, length) of each payload array for a gradient of `size` entries."""

    @abc.abstractmethod
    def encode(self, flat: np.ndarray, rng: np.random.Generator) -> Payload:
        """The payload of `flat` (float32, 1-D)."""

    @abc.abstractmethod
    def decode(self, payload: Payload, size: int) -> np.ndarray:
        """The float32 (size,) gradient the payload stands for."""


CODECS: Registry[type[Codec]] = Registry("compression")


@CODECS.register("none")
class Dense(Codec):
    def layout(self, size):
        return ((np.dtype(np.float32), size),)

    def encode(self, flat, rng):
        return (np.ascontiguousarray(flat, dtype=np.float32),)

    def decode(self, payload, size):
        return payload[0]


@CODECS.register("bf16")
class BFloat16(Codec):
    """Round to nearest bfloat16 (8 significant bits) and send its 16 bits."""

    def layout(self, size):
        return ((np.dtype(np.uint16), size),)

    def encode(self, flat, rng):
        return (np.asarray(flat, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16),)

    def decode(self, payload, size):
        return payload[0].view(ml_dtypes.bfloat16).astype(np.float32)


class Sparse(Codec):
    """k = ceil(fraction * n) (at least 1) entries as int32 indices and float32 values."""

    def __init__(self, config: PSConfig):
        super().__init__(config)
        self.fraction = config.compression_fraction

    def kept(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size)))

    def layout(self, size):
        k = self.kept(size)
        return ((np.dtype(np.int32), k), (np.dtype(np.float32), k))

    def decode(self, payload, size):
        indices, values = payload
        out = np.zeros(size, np.float32)
        out[indices] = values
        return out


@CODECS.register("topk")
class TopK(Sparse):
    """The k entries of largest magnitude, exactly (Aji & Heafield 2017; Lin et al. 2018)."""

    def encode(self, flat, rng):
        k = self.kept(flat.size)
        indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
        return indices.astype(np.int32), flat[indices].astype(np.float32)


@CODECS.register("randk")
class RandomK(Sparse):
    """k entries drawn uniformly without replacement, scaled by n / k: unbiased."""

    randomized = True

    def encode(self, flat, rng):
        k = self.kept(flat.size)
        indices = np.sort(rng.choice(flat.size, size=k, replace=False))
        values = flat[indices].astype(np.float32) * np.float32(flat.size / k)
        return indices.astype(np.int32), values


@CODECS.register("sign")
class Sign(Codec):
    """1 bit per entry and one scale, mean(|x|), which minimises ||x - scale * sign(x)||:
    the squared error is exactly ||x||^2 - ||x||_1^2 / n. Zeros send +scale."""

    def layout(self, size):
        return ((np.dtype(np.float32), 1), (np.dtype(np.uint8), -(-size // 8)))

    def encode(self, flat, rng):
        scale = np.mean(np.abs(flat), dtype=np.float64)
        return np.array([scale], np.float32), np.packbits(flat >= 0)

    def decode(self, payload, size):
        scale, bits = payload
        signs = np.unpackbits(bits, count=size).astype(np.float32) * 2 - 1
        return signs * scale[0]


def level_dtype(levels: int) -> np.dtype:
    """The smallest signed integer dtype holding -levels..levels."""
    for dtype in (np.int8, np.int16, np.int32):
        if levels <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"ps.qsgd_levels={levels} does not fit in 32 bits")


@CODECS.register("qsgd")
class QSGD(Codec):
    """Alistarh et al. 2017: x_i = ||x|| * sign(x_i) * l_i / s with l_i in 0..s drawn so
    that E[l_i] = s |x_i| / ||x||: unbiased, each entry off by at most ||x|| / s."""

    randomized = True

    def __init__(self, config: PSConfig):
        super().__init__(config)
        self.levels = config.qsgd_levels
        self.dtype = level_dtype(self.levels)

    def layout(self, size):
        return ((np.dtype(np.float32), 1), (self.dtype, size))

    def encode(self, flat, rng):
        norm = np.float32(np.linalg.norm(flat.astype(np.float64)))
        if norm == 0:
            return np.zeros(1, np.float32), np.zeros(flat.size, self.dtype)
        scaled = np.minimum(np.abs(flat) / norm * self.levels, self.levels)  # in [0, s]
        low = np.floor(scaled)
        level = low + (rng.random(flat.size) < scaled - low)
        return np.array([norm], np.float32), (np.sign(flat) * level).astype(self.dtype)

    def decode(self, payload, size):
        norm, levels = payload
        return levels.astype(np.float32) * (norm[0] / np.float32(self.levels))


def make_codec(config: PSConfig) -> Codec:
    return CODECS.get(config.compression)(config)


def payload_bytes(payload: Payload) -> int:
    return sum(int(a.nbytes) for a in payload)


def to_bytes(payload: Payload | np.ndarray) -> bytes:
    """The payload's arrays' bytes, one after the other; a bare array is sent as the 'none'
    codec's payload (itself, as float32)."""
    if isinstance(payload, np.ndarray):
        payload = (np.asarray(payload, np.float32),)
    return b"".join(np.ascontiguousarray(a).tobytes() for a in payload)


def from_bytes(codec: Codec, size: int, buffer, offset: int) -> tuple[Payload, int]:
    """The payload of a `size`-entry gradient at `offset` in `buffer`; the offset after it."""
    arrays = []
    for dtype, length in codec.layout(size):
        arrays.append(np.frombuffer(buffer, dtype=dtype, count=length, offset=offset))
        offset += dtype.itemsize * length
    return tuple(arrays), offset


def push_rng(config: PSConfig, worker: int, clock: int, shard: int) -> np.random.Generator:
    """The codec's randomness for one push: a function of (seed, worker, clock, shard),
    so runs are reproducible on every transport and a restarted worker draws the same."""
    return np.random.default_rng([config.seed, worker, clock, shard])


class Compressor:
    """A worker's side: encodes each pushed gradient, keeping the residual per parameter
    when error feedback is on."""

    def __init__(self, config: PSConfig):
        self.codec = make_codec(config)
        self.error_feedback = config.error_feedback
        self.residual: dict[str, np.ndarray] = {}  # name -> flat float32 (error feedback)

    def encode(self, grads: dict[str, np.ndarray], rng: np.random.Generator
               ) -> dict[str, Payload]:
        """{name: payload} of one shard's gradients, in sorted name order (the rng's)."""
        out = {}
        for name in sorted(grads):
            flat = np.asarray(grads[name], np.float32).reshape(-1)
            if self.error_feedback:
                flat = flat + self.residual.get(name, 0)
            out[name] = self.codec.encode(flat, rng)
            if self.error_feedback:
                self.residual[name] = flat - self.codec.decode(out[name], flat.size)
        return out


def decode_grads(codec: Codec, payloads: dict[str, Payload],
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """{name: float32 array of its shape} from a push's payloads."""
    return {name: codec.decode(p, math.prod(shapes[name])).reshape(shapes[name])
            for name, p in payloads.items()}
