"""The decode caches and the steps that run against them: eagerly, torch.compile'd, or replayed as CUDA graphs.

Every decoder allocates its teacher's KV cache here (`make_cache`): sized in LENGTH_BUCKET rows when compiled, so
that nearby requests share graphs (`kforcing.decoding.compiled.static_length`), and with cuda_graph=True the
model's pooled cache, which its captured graphs replay against. `Step` runs one decode step function in whichever
of the three ways the request asked for.
"""

import dataclasses
import weakref
from typing import Optional

import torch

from kforcing_ops.nn import linear_mode

from ..models.transformer import KVCache
from .compiled import compiled, static_length

_MAX_GRAPHS = 16  # captured shapes kept per pooled cache; further shapes run eagerly
_graph_pool = weakref.WeakKeyDictionary()  # model -> _CudaGraphs (cuda_graph=True only)


@dataclasses.dataclass
class _CudaGraphs:
    """The KV cache and the CUDA graphs captured against it, kept between generate calls of one model.

    A CUDA graph replays fixed memory addresses, so it can only be reused with the very cache it was captured
    against: with cuda_graph=True the cache of the last call (same batch size, dtype and device, and at least as
    long as needed) is kept and reset instead of reallocated, and graphs are captured once per step shape and
    reused by later calls (so calls with different k or lengths share one cache instead of evicting each other).
    This makes concurrent generate calls with cuda_graph=True on one model unsafe (one thread at a time).
    """

    key: tuple
    cache: KVCache
    graphs: dict = dataclasses.field(default_factory=dict)
    pool: object = dataclasses.field(default_factory=lambda: torch.cuda.graph_pool_handle())


def make_cache(model, batch, max_len, compile=False, cuda_graph=False):
    """(cache, _CudaGraphs or None): a fresh cache of at least max_len rows (rounded up to a length bucket with
    compile), or with cuda_graph the model's pooled one, reset."""
    max_len = static_length(max_len) if compile else max_len
    if not cuda_graph:
        return KVCache.for_model(model, batch, max_len), None
    if model.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    key = (batch, model.dtype, model.device, model.config)
    entry = _graph_pool.get(model)
    if entry is None or entry.key != key or entry.cache.max_len < max_len:
        _graph_pool.pop(model, None)  # free the previous cache and graphs first
        entry = _CudaGraphs(key, KVCache.for_model(model, batch, max_len))
        _graph_pool[model] = entry
    entry.cache.reset()
    return entry.cache, entry


class Step:
    """A decode step function run eagerly, compiled, or replayed from a CUDA graph (one graph per input shape).

    fn(*bound, *inputs): `bound` are the model, the cache and constants; `inputs` the per-step tensors. The step
    mutates the KV cache in place and returns a tensor. For a CUDA graph (`cuda_graphs` given) the inputs are
    copied into static buffers; warm-up runs happen on a side stream with the cache lengths restored afterwards,
    so they leave no trace (the rows they wrote are rewritten by the real step). Graphs are keyed by the
    function, the constants, the linear layers' mode (`kforcing_ops.nn.linear_mode`) and the input shapes.
    """

    def __init__(self, fn, bound, cache, compile=False, cuda_graphs: Optional[_CudaGraphs] = None):
        self.name = fn.__name__
        self.fn = compiled(fn) if compile else fn
        self.bound = tuple(bound)
        self.constants = tuple(b for b in self.bound[2:] if not isinstance(b, torch.Tensor))
        self.cache = cache
        self.cuda_graphs = cuda_graphs

    def __call__(self, *inputs):
        if self.cuda_graphs is None:
            return self.fn(*self.bound, *inputs)
        graphs = self.cuda_graphs.graphs
        key = (self.name, self.constants, linear_mode(), tuple((tuple(t.shape), t.dtype) for t in inputs))
        if key not in graphs:
            if len(graphs) >= _MAX_GRAPHS:
                return self.fn(*self.bound, *inputs)
            graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output = graphs[key]
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return static_output.clone()

    def _capture(self, inputs):
        static_inputs = [t.clone() for t in inputs]
        saved = self.cache.seqlens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*self.bound, *static_inputs)
                self.cache.seqlens.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.cuda_graphs.pool):
            static_output = self.fn(*self.bound, *static_inputs)
        self.cache.seqlens.copy_(saved)  # capture records the += n_commit without running it
        return graph, static_inputs, static_output


__all__ = ["Step", "make_cache"]
