"""The student kinds the library knows (`kforcing.students.protocol.StudentKind`), and how the workflows find one:
by `kforcing distill --pathway`, by a checkpoint's model_type, or by the model in hand. A new kind is one line
here."""

from typing import Optional, Tuple

from .draft.kind import DraftKind
from .protocol import StudentKind
from .push_forward.kind import PushForwardKind

KINDS: Tuple[StudentKind, ...] = (PushForwardKind(), DraftKind())


def student_kinds() -> Tuple[StudentKind, ...]:
    """Every kind, in order (read at each call: a test may add one to KINDS)."""
    return KINDS


def kind_named(name: str) -> StudentKind:
    """The kind whose checkpoints have model_type `name` (KeyError naming the known ones otherwise)."""
    for kind in student_kinds():
        if kind.name == name:
            return kind
    raise KeyError(f"unknown student kind {name!r}; known: {', '.join(kind.name for kind in student_kinds())}")


def kind_for_pathway(pathway: str) -> StudentKind:
    """The kind `kforcing distill --pathway pathway` trains (KeyError naming the known pathways otherwise)."""
    for kind in student_kinds():
        if pathway in kind.pathways:
            return kind
    raise KeyError(f"unknown pathway {pathway!r}; choose one of {', '.join(pathways())}")


def kind_of(model) -> Optional[StudentKind]:
    """The kind of a loaded model; None for a teacher (or anything that is not a student)."""
    for kind in student_kinds():
        if isinstance(model, kind.model_class):
            return kind
    return None


def pathways() -> Tuple[str, ...]:
    """Every `kforcing distill --pathway` value, in the kinds' order."""
    return tuple(pathway for kind in student_kinds() for pathway in kind.pathways)


__all__ = ["KINDS", "kind_for_pathway", "kind_named", "kind_of", "pathways", "student_kinds"]
