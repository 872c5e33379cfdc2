"""kforcing_ops: the K-Forcing kernels as PyTorch ops (torch.ops.kforcing.*).

    inverse_cdf_sample       batched inverse-CDF sampling from explicit uniforms
    window_attention         block-causal (staircase) attention over [context | k-token windows], training
    window_attention_decode  attention of [committed | hint] rows against a preallocated KV cache
    noise_embedding          fused sinusoidal features of (u, tau) + Linear
    noise_conditioned_embedding  [token embeddings | noise embeddings]: a model's whole input sequence
    decode_linear            x @ W^T + b for the 1-16 rows of a decode step, streaming W once (inference only)

`reference` holds a pure-PyTorch version of each, and `with use_reference():` runs it in place of the kernels;
`python -m kforcing_ops.info` shows how this was built.
Importing initialises no CUDA.
"""

from . import _ext
from ._checks import CDF_ORDERS, NOISE_CODES
from ._ext import use_reference
from . import reference
from .attention import window_attention, window_attention_decode
from .embedding import noise_conditioned_embedding, noise_embedding
from .linear import decode_linear
from .sampling import cdf_interval, inverse_cdf_sample, raise_on_invalid_samples, sampling_probabilities

__version__ = _ext.BUILD_INFO["version"]

__all__ = [
    "CDF_ORDERS",
    "NOISE_CODES",
    "cdf_interval",
    "decode_linear",
    "inverse_cdf_sample",
    "noise_conditioned_embedding",
    "noise_embedding",
    "raise_on_invalid_samples",
    "reference",
    "sampling_probabilities",
    "use_reference",
    "window_attention",
    "window_attention_decode",
]
