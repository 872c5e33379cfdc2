"""The names of the drafter checkpoint kforcing writes for vLLM (`kforcing.serving.vllm_export`), shared by the
export, the `kforcing serve` checks and the plugin vLLM loads; no imports, so that vLLM's processes and a machine
without kforcing's kernels can read them."""

# The version of the directory's layout, in config.json's "kforcing" section.
FORMAT_VERSION = 1
# config.json's architecture (vLLM's "eagle" method looks it up as "Eagle" + this name).
ARCHITECTURE = "KForcingChainHead"
# Hugging Face families whose vLLM implementation hands an EAGLE drafter the final norm's output (the feature a
# chain head of such a teacher was trained on).
SERVED_FAMILIES = ("llama", "mistral", "qwen2")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which kforcing's blocks use

__all__ = ["ARCHITECTURE", "FORMAT_VERSION", "LAYER_NORM_EPS", "SERVED_FAMILIES"]
