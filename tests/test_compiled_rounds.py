"""Compiled decoding rounds: torch.compile (inductor, real code generation) of a draft student's drafting round and
plain AR step gives the eager round's output bit for bit, with one graph per shape and no graph break."""

import pytest
import torch

from kforcing.decoding.compiled import compilations
from kforcing.decoding.generate import generate_ar
from kforcing.students.draft.decode import generate_with_drafts
from kforcing.students.draft.student import HeadConfig
from kforcing.models.transformer import cast_linear_weights

from tiny_models import draft_student, peaked_teacher

PROMPTS = [[1, 5, 9, 2, 7], [3], [4, 4, 8, 11, 20, 31, 2, 6, 9]]
SAMPLING = dict(temperature=0.7, top_k=20, top_p=0.9)


@pytest.fixture(scope="module", params=["chain", "onepass"])
def student(request):
    """The default chain student, or a onepass student (its round: the teacher's call with every hint set)."""
    if request.param == "onepass":
        return draft_student(peaked_teacher(), HeadConfig(max_k=3, pathway="onepass", adapter_rank=4))
    student = draft_student(peaked_teacher(), HeadConfig(num_layers=1, max_k=3, pathway="chain", draft_vocab=64))
    cast_linear_weights(student.head, torch.bfloat16)  # as `kforcing eval` and `sample` draft: bf16 head weights
    return student


def test_compiled_round_equals_the_eager_round_bit_for_bit(student):
    """Inductor on CPU: the drafting round (k = 3, two drafts) and the plain AR step, compiled as wholes, give the
    eager decoder's tokens, which are AR's; the second call compiles nothing more. For the chain and the onepass
    pathways."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eos = 11
    want = generate_ar(student.teacher, PROMPTS, 24, seed=3, eos_id=eos, **SAMPLING)
    eager = generate_with_drafts(student, PROMPTS, 24, k=3, seed=3, eos_id=eos, **SAMPLING)
    assert torch.equal(eager.tokens, want.tokens) and compilations() == 0
    # a onepass decode has two round graphs: its first round verifies stand-ins and is left out of the statistics
    graphs = 2 if student.pathway == "onepass" else 1
    for _ in range(2):
        got = generate_with_drafts(student, PROMPTS, 24, k=3, seed=3, eos_id=eos, compile=True, **SAMPLING)
        assert torch.equal(got.tokens, eager.tokens) and torch.equal(got.lengths, eager.lengths)
        assert got.num_passes == eager.num_passes and got.accepted == eager.accepted
        assert compilations() == graphs, dict(counters["stats"])  # compiled once: no recompile on reuse
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Adaptive drafting, compiled: the plain AR step and each draft count are graphs of their own; still AR's output.
    got = generate_with_drafts(student, PROMPTS, 24, seed=3, eos_id=eos, compile=True,
                               round_costs=(1.0, 1.2), **SAMPLING)
    assert torch.equal(got.tokens, want.tokens)
    assert not counters["graph_break"], dict(counters["graph_break"])
