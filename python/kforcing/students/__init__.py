"""Students: the models that produce k tokens per round, each kind a package with everything the workflows need
from it (`protocol.StudentKind`), found through `registry`.

    protocol       StudentKind: load, distill, decode, evaluate and report one kind of student
    registry       the kinds (KINDS) and their lookup by pathway, checkpoint model_type or model
    push_forward   PushForwardLM, the teacher's backbone plus a noise embedding, k tokens per forward pass:
                   model, targets, distill (stages), checkpoint, evaluate, report, kind
    draft          DraftStudent on a frozen teacher, whose drafts the teacher verifies: student (HeadConfig,
                   Sampling, the hint head), chain_head (the default), trunk_adapters / hf_adapters, draft_module,
                   targets, distill, decode (verified and unverified), policy (adaptive drafting), speculative,
                   checkpoint, evaluate, report, kind

Imports training/, evaluation/, decoding/, checkpoints/, teachers/, models/ and below; never workflows/ or cli/.
"""
