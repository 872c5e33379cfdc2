"""Serving distilled students outside kforcing: vLLM.

    vllm_export     a chain student of a Hugging Face teacher, written as a checkpoint vLLM serves as its EAGLE drafter
"""
