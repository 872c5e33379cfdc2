"""Students: the models that produce k tokens per round, built from (and, for draft students, on) a teacher.

    push_forward     PushForwardLM: the teacher's backbone plus a noise embedding, k tokens per forward pass
    draft_student    DraftStudent on a frozen teacher: its config (HeadConfig), sampling settings, hint head and
                     the drafting of a round's tokens from logits and uniforms
    chain_head       the chain pathway's head: k-1 cheap calls on the teacher's features (the default)
    draft_module     the base of every trainable drafting module (its config, state and parameter accounting)
    trunk_adapters   low-rank adapters on a kforcing teacher's blocks, for hint rows (the trunk pathway)
    hf_adapters      the same adapters on a Hugging Face teacher's linear layers

Imports teachers/, models/ and below.
"""
