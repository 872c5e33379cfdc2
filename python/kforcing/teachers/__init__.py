"""Teachers: the protocol a frozen AR teacher implements, and Hugging Face causal LMs behind it.

    protocol       what students, decoding and evaluation call on a teacher (embed, run_layers, logits, decode);
                   ARModel and HFTeacher implement it
    hf_teacher     HFTeacher: a transformers causal LM (`--teacher hf:PATH`) on kforcing's attention and KV cache
    hf_attention   the attention function registered with transformers, routing to kforcing_ops

Imports models/ and below.
"""
