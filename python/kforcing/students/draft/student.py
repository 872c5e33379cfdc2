"""A draft student with teacher-exact token rows: the frozen AR teacher plus trainable hint rows (docs/method.md §8).

Every row that holds a real token (context, committed tokens) runs through the frozen teacher, so its logits are
the teacher's own, bit for bit. Only the hint rows' module trains. For a window anchored at token position t:

    trunk   the teacher over the tokens 0..t -> its token stream and exact logits
    y1      token t+1 = inverse_cdf_sample(teacher logits at t, u_1): an exact teacher sample
    draft   the window rows [y1 as a token row | hint rows carrying u_2, u_3, ...] -> drafts of tokens 2..k

Two pathways compute the draft rows (`HeadConfig.pathway`):

    head    a `HintHead`: a few Transformer blocks (initialised from the teacher's last blocks) over
            [the trunk's final features h_0..h_t | window rows], ending in the teacher's LM head.
    trunk   `kforcing.students.draft.trunk_adapters.TrunkAdapters`: the window rows run through every block of
            the teacher; the y1 row with the teacher's weights, hint rows with per-layer adapters (a row-gated LoRA
            of rank `adapter_rank`, or full copies of the blocks for adapter_rank=0). At layer l they attend to the
            teacher's keys/values of tokens 0..t at layer l (the token stream) and to their own window.

Row i of a window (0 = the y1 row) sits at position t+1+i and, for i >= 1, carries the uniform of the token at its
own position through a noise embedding e(u, tau). Two readouts turn the rows' outputs into drafts:

    onehot       rows 1..k-1 are hints for u_2..u_k; draft j = argmax of the logits at the row of position j.
    categorical  rows 0..k-2 (y1 and hints for u_2..u_{k-1}) each output a distribution over the NEXT token;
                 draft j = inverse_cdf_sample(that distribution, u_j), so the row that drafts token j never sees
                 u_j, only u_2..u_{j-1}. In the trunk pathway row 0 is the teacher's own computation, so the
                 draft of token 2 is the teacher's token (and with k = 2 there is nothing to train).

A third pathway makes a round's drafts in the teacher's own verify pass (docs/method.md §8, design b):

    onepass `TrunkAdapters` (a row-gated LoRA by default) as in the trunk pathway, but the window has no y1 row:
            row i sits at t+1+i and carries u_{t+1+i}, the uniform of the token at its own position, and outputs
            the distribution of the next token (categorical readout). Row 0 stands for the teacher's token at t+1,
            which the rows may infer from the teacher's keys/values up to t and u_{t+1} without seeing it. That
            is what lets a decoding round (`kforcing.students.draft.decode`) run the hint rows for every number of
            drafts that may be accepted in the same teacher call as the verify rows, each set masked to its
            accepted prefix (Parallel Token Prediction's layout): one read of the teacher's weights a round.

A fourth pathway drafts differently, one token per head call (`kforcing.students.draft.chain_head.ChainHead`):

    chain   a small head (a fuse Linear and copies of the teacher's last block(s)) reads the teacher's final feature
            and the next token, and its output stands for the teacher's next feature; drafts follow in a chain,
            each sampled with its position's uniform. A round reads the teacher once plus k-1 one-row head calls.

A window therefore has k rows (onehot) or k-1 rows (categorical), and the draft rows see the same staircase as the
student of §3: window rows see the context up to their anchor and their own window causally.

`DraftStudent` holds the teacher and the trainable module (`student.head`, in either pathway: all its trainable
parameters); `kforcing.students.draft.decode` decodes with it, with or without verification. The teacher is anything
that implements `kforcing.teachers.protocol`'s protocol: kforcing's `ARModel`, or a Hugging Face causal LM
(`HFTeacher`), which takes the trunk pathway with `kforcing.students.draft.hf_adapters.HFTrunkAdapters` on its own
linear layers (docs/method.md §9).
"""

import dataclasses
import hashlib
from typing import List, NamedTuple, Optional

import torch
from torch import nn

import kforcing_ops
from kforcing_ops.nn import NoiseEmbedding

from ...models.transformer import ARModel, Block, ModelConfig, cast_linear_weights, decode_blocks, run_blocks
from ...teachers.hf_teacher import HFTeacher
from ...teachers.protocol import check_teacher
from .chain_head import ChainHead
from .draft_module import DraftModule
from .hf_adapters import HFTrunkAdapters
from .trunk_adapters import TrunkAdapters

READOUTS = ("onehot", "categorical")
NOISE_CODES = kforcing_ops.NOISE_CODES
CDF_ORDERS = kforcing_ops.CDF_ORDERS
PATHWAYS = ("head", "trunk", "chain", "onepass")
# The pathways whose hint rows run through the teacher's own blocks with `TrunkAdapters`.
TRUNK_PATHWAYS = ("trunk", "onepass")


def teacher_fingerprint(teacher) -> str:
    """sha256 (first 16 hex digits) of the teacher's config and weights: a head is only valid on this teacher."""
    digest = hashlib.sha256(repr(sorted(teacher.fingerprint_config().items())).encode())
    for name, value in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# The defaults of the kforcing releases that wrote checkpoints without these keys (see HeadConfig.from_dict).
_BEFORE_DEFAULTS_CHANGED = {"readout": "onehot", "pathway": "head", "adapter_rank": 8}


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The shape of a draft student's trainable part (a hint head, or trunk adapters).

    The dataclass defaults describe a trunk-pathway student with the categorical readout (the adapters' rank
    fixed when they are built); `kforcing distill` trains the chain pathway by default
    (`kforcing.workflows.distill.DEFAULT_PATHWAY`, one block).

    Attributes:
        num_layers: Transformer blocks in the head (copied from the teacher's last blocks at initialisation).
        max_k: tokens per window the head is built for: the exact y1 plus max_k - 1 drafts (>= 2).
        readout: "onehot" or "categorical" (see the module docstring).
        noise_num_freqs: F of the noise embedding (default: width // 2).
        noise_code: how the hint rows encode their uniforms: "sinusoid", "dyadic" or "binary" (see
            `kforcing_ops.noise_embedding`).
        pathway: "head" (hint rows through a separate `HintHead` on the teacher's final features), "trunk"
            (hint rows through the teacher's own blocks with row-gated adapters,
            `kforcing.students.draft.trunk_adapters`), "onepass" (the trunk's adapters on a window with no exact
            row, drafted inside the teacher's verify pass; categorical readout) or
            "chain" (a `ChainHead` drafting one token per call from the teacher's features; categorical readout,
            num_layers blocks, no noise embedding).
        draft_vocab: chain pathway only: drafts come from the draft_vocab most frequent tokens of the training
            text (a smaller LM head read per draft); None: the whole vocabulary.
        adapter_rank: trunk and onepass pathways only: r >= 1, a rank-r LoRA on every linear layer of every block
            (q/k/v, attention output, both MLP layers), for hint rows only; 0, a full trainable copy of every block's
            weights, for hint rows only. At most the model width (checked when the adapters are built). None: the
            teacher's default, fixed when the adapters are built (so a checkpoint always records a number):
            `TrunkAdapters.DEFAULT_RANK` (0, a full copy) for kforcing's own teachers (onepass:
            `TrunkAdapters.ONE_PASS_RANK`, a LoRA, so that its one call reads the teacher's weights once) and
            `HFTrunkAdapters.DEFAULT_RANK` (a LoRA) for Hugging Face teachers. num_layers is unused by the trunk
            pathway (it adapts every block).
    """

    num_layers: int = 2
    max_k: int = 4
    readout: str = "categorical"
    noise_num_freqs: Optional[int] = None
    noise_code: str = "sinusoid"
    pathway: str = "trunk"
    adapter_rank: Optional[int] = None
    draft_vocab: Optional[int] = None

    def __post_init__(self):
        for name in ("num_layers", "max_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HeadConfig.{name} must be a positive int, got {value!r}")
        if self.max_k < 2:
            raise ValueError(f"HeadConfig.max_k must be >= 2 (y1 is exact; the head drafts tokens 2..k), "
                             f"got {self.max_k}")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {READOUTS}")
        if self.noise_code not in NOISE_CODES:
            raise ValueError(f"unknown noise_code {self.noise_code!r}; choose one of {NOISE_CODES}")
        if self.pathway not in PATHWAYS:
            raise ValueError(f"unknown pathway {self.pathway!r}; choose one of {PATHWAYS}")
        vocab = self.draft_vocab
        if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 2):
            raise ValueError(f"HeadConfig.draft_vocab must be an int >= 2 (or None: the whole vocabulary), got "
                             f"{vocab!r}")
        if vocab is not None and self.pathway != "chain":
            raise ValueError(f"draft_vocab applies to the chain pathway only, not {self.pathway!r}")
        if self.pathway in ("chain", "onepass") and self.readout != "categorical":
            raise ValueError(f"the {self.pathway} pathway drafts from distributions: it needs readout 'categorical', "
                             f"got {self.readout!r}")
        rank = self.adapter_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ValueError(f"HeadConfig.adapter_rank must be an int >= 0 (r >= 1: a rank-r LoRA; 0: a full copy "
                             f"of each block), got {rank!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        """The inverse of to_dict; an unknown key (a checkpoint from a newer kforcing) is a clear error.

        A key a checkpoint lacks takes the value of the kforcing that wrote it, not today's default: checkpoints
        older than the trunk pathway (no "pathway") are hint heads with the readout they were written with.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown head settings {unknown}: this kforcing knows {sorted(known)}")
        return cls(**{**_BEFORE_DEFAULTS_CHANGED, **data})

    def window_rows(self, k):
        """Rows of one window for k tokens: y1 + k-1 hints (onehot) or y1 + k-2 hints (categorical), or k-1 hints
        (onepass: no y1 row)."""
        return k if self.readout == "onehot" else k - 1

    @property
    def exact_rows(self) -> int:
        """Token rows at the head of a window: 1 (y1), or 0 in the onepass pathway (every row a hint)."""
        return 0 if self.pathway == "onepass" else 1


class HintHead(DraftModule):
    """The trainable part of a head-pathway `DraftStudent`: blocks, a final norm and the noise encoder."""

    def __init__(self, model_config: ModelConfig, config: HeadConfig):
        super().__init__()
        if config.pathway != "head":
            raise ValueError(f"a HintHead is the 'head' pathway; this HeadConfig has pathway={config.pathway!r} "
                             "(build it with build_head or DraftStudent.from_teacher)")
        if config.num_layers > model_config.n_layer:
            raise ValueError(f"a head of {config.num_layers} layers cannot be copied from a teacher of "
                             f"{model_config.n_layer} layers")
        self.config, self.model_config = config, model_config
        self.teacher_fingerprint: Optional[str] = None  # set by DraftStudent: the teacher these weights belong to
        self.blocks = nn.ModuleList(Block(model_config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(model_config.n_embd, bias=False)
        self.noise = NoiseEmbedding(model_config.n_embd, num_freqs=config.noise_num_freqs, code=config.noise_code)

    @classmethod
    def from_teacher(cls, teacher: ARModel, config: HeadConfig):
        """A head whose blocks and final norm start as copies of the teacher's last blocks and final norm."""
        head = cls(teacher.config, config).to(device=teacher.device, dtype=teacher.dtype)
        for mine, theirs in zip(head.blocks, teacher.blocks[-config.num_layers:]):
            mine.load_state_dict(theirs.state_dict())
        head.norm.load_state_dict(teacher.norm.state_dict())
        return head


def head_class(teacher, pathway: str):
    """The trainable module's class of `pathway` on `teacher`: `HintHead`, `TrunkAdapters` or `ChainHead` on an
    ARModel; `HFTrunkAdapters` or `ChainHead` on a Hugging Face teacher (which has no head pathway: a HintHead
    copies kforcing blocks). Every class has `from_teacher(teacher, config)` and `blank(teacher, config)`."""
    if isinstance(teacher, HFTeacher):
        if pathway == "head":
            raise ValueError("pathway 'head' needs a kforcing ARModel teacher (its hint head copies the teacher's "
                             "kforcing blocks); a Hugging Face teacher takes pathway 'trunk' or 'chain'")
        if pathway == "onepass":
            raise ValueError("pathway 'onepass' needs a kforcing ARModel teacher (its round runs every hint set in "
                             "the teacher's own decode call); a Hugging Face teacher takes pathway 'trunk' or 'chain'")
        return HFTrunkAdapters if pathway == "trunk" else ChainHead
    return {"trunk": TrunkAdapters, "onepass": TrunkAdapters, "head": HintHead, "chain": ChainHead}[pathway]


def build_head(teacher, config: HeadConfig):
    """The trainable module of `config.pathway`, initialised from the teacher: a `HintHead` ("head"),
    `TrunkAdapters` or `HFTrunkAdapters` ("trunk" and "onepass"; they check adapter_rank against the teacher's width), a
    `ChainHead` ("chain")."""
    check_teacher(teacher, "a draft student")
    return head_class(teacher, config.pathway).from_teacher(teacher, config)


class TokenStream(NamedTuple):
    """What the teacher's pass over the context gives the draft rows.

    features: (B, N, H) final hidden states before the final norm (the head pathway's input).
    keys, values: per layer, (B, N, H_kv, D) rotated keys and values (the trunk pathway attends to them); None
        in the head pathway.
    """

    features: torch.Tensor
    keys: Optional[List[torch.Tensor]] = None
    values: Optional[List[torch.Tensor]] = None


class DraftStudent:
    """A frozen AR teacher (token rows, exact) and a trainable module for the hint rows.

    Attributes:
        teacher: the teacher (an ARModel or an HFTeacher, `kforcing.teachers.protocol`); its parameters are frozen
            (requires_grad False) and never saved with the head.
        head: the trainable module of the pathway: a `HintHead` ("head"), `TrunkAdapters` or `HFTrunkAdapters`
            ("trunk"); `head.parameters()` is all that trains.
        fingerprint: `teacher_fingerprint(teacher)`, stored in checkpoints and checked when loading.
    """

    model_type = "draft"  # the model_type of its checkpoints (the head's export_config writes it)

    def __init__(self, teacher, head, fingerprint: Optional[str] = None):
        """fingerprint: `teacher_fingerprint(teacher)` when the caller has it already (it hashes every weight)."""
        check_teacher(teacher, "a DraftStudent")
        expected = head_class(teacher, head.config.pathway)
        if not isinstance(head, expected):
            raise TypeError(f"pathway {head.config.pathway!r} needs a {expected.__name__}, got {type(head).__name__}")
        if head.model_config != teacher.config:
            raise ValueError("the head was built for another model config than the teacher's")
        teacher.requires_grad_(False)
        self.teacher, self.head = teacher, head
        self.fingerprint = fingerprint or teacher_fingerprint(teacher)
        head.teacher_fingerprint = self.fingerprint
        # The cumulative acceptance of draft offsets 1..max_k-1 its distillation measured on held-out text (verified
        # decoding), when known: adaptive drafting's prior before a request has measured its own.
        self.measured_acceptance: Optional[List[float]] = None

    @classmethod
    def from_teacher(cls, teacher, config: HeadConfig = HeadConfig()):
        return cls(teacher, build_head(teacher, config))

    @property
    def config(self):
        """The teacher's config (a ModelConfig, or an HFModelConfig for a Hugging Face teacher)."""
        return self.teacher.config

    @property
    def head_config(self) -> HeadConfig:
        return self.head.config

    @property
    def pathway(self) -> str:
        return self.head.config.pathway

    @property
    def max_k(self) -> int:
        return self.head.config.max_k

    @property
    def device(self):
        return self.teacher.device

    def eval(self):
        self.teacher.eval()
        self.head.eval()
        return self

    def to(self, *args, **kwargs):
        """Move or cast the teacher and the head together (as nn.Module.to)."""
        self.teacher.to(*args, **kwargs)
        self.head.to(*args, **kwargs)
        return self

    @property
    def dtype(self):
        return self.teacher.dtype

    def store_draft_weights(self, dtype):
        """Store the head's linear weights as `dtype` for decoding (float32 or bfloat16; `cast_linear_weights`):
        bfloat16 halves the bytes drafting reads, and since drafts only propose, verified output is unchanged. For
        the chain and head pathways, whose drafting runs the head alone; a trunk student's adapters run inside the
        teacher's pass and stay as they are. Returns self."""
        if self.pathway not in TRUNK_PATHWAYS:
            cast_linear_weights(self.head, dtype)
        return self

    def num_params(self) -> int:
        """Trainable (head) parameters: what a draft checkpoint stores."""
        return sum(p.numel() for p in self.head.parameters())

    # -- the trunk (exact teacher) -----------------------------------------------------------------------------

    def trunk(self, ids, positions=None):
        """(TokenStream, logits (B, S, V)) of the teacher over ids (B, S).

        The stream holds the features (before the final norm) and, in the trunk pathway, every layer's keys and
        values; they are read off the teacher's own pass, so the logits are the teacher's bit for bit.
        """
        teacher = self.teacher
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        keys, values = ([], []) if self.pathway in TRUNK_PATHWAYS else (None, None)

        def attend(layer, q, k, v):
            if keys is not None:
                keys.append(k)
                values.append(v)
            return kforcing_ops.window_attention(q, k, v, 0, 1)

        features = teacher.run_layers(teacher.embed(ids), positions, attend)
        return TokenStream(features, keys, values), teacher.logits(features)

    def teacher_window_logits(self, ids, window_tokens):
        """Teacher logits after every row of token windows: ids (B, N), window_tokens (B, W, m) -> (B, W, m, V).

        Window t holds real tokens at positions t+1..t+m after context 0..t (the staircase of §3 with token rows),
        so its row j gives the teacher's exact distribution of the token at t+2+j given those tokens.
        """
        teacher = self.teacher
        batch, context = ids.shape
        windows, rows = window_tokens.shape[1], window_tokens.shape[2]
        x = teacher.embed(torch.cat([ids, window_tokens.flatten(1)], dim=1))
        features = teacher.run_layers(x, self.staircase_positions(context, windows, rows, ids.device),
                                      lambda layer, q, k, v: kforcing_ops.window_attention(q, k, v, windows, rows))
        logits = teacher.logits(features[:, context:])
        return logits.view(batch, windows, rows, -1)

    @staticmethod
    def staircase_positions(context, windows, rows, device):
        """Rotary positions of [context 0..context-1 | `windows` windows of `rows` rows, window t at t+1, ...]."""
        return torch.cat([torch.arange(context, device=device),
                          DraftStudent._window_positions(windows, rows, device)])

    @staticmethod
    def _window_positions(windows, rows, device):
        window = torch.arange(windows, device=device)[:, None] + 1 + torch.arange(rows, device=device)[None, :]
        return window.flatten()

    # -- the draft rows -----------------------------------------------------------------------------------------

    def window_inputs(self, y1, u, tau):
        """The input rows of every window: (B, W, rows, H) = [tok_emb(y1) | e(u_2..), tau)], or in the onepass
        pathway [e(u_1..), tau)] (row 0 stands for y1 without seeing it).

        y1: (B, W) exact first tokens; u: (B, W, k) uniforms of tokens 1..k (u[..., 0] is y1's: a hint in the
        onepass pathway, unused in the others).
        """
        k, config = u.shape[2], self.head.config
        exact = config.exact_rows
        hints = u[..., exact:config.window_rows(k)]
        y1_rows = self.teacher.embed(y1)[:, :, None]
        if exact == 0:
            return self.hint_rows(hints, tau).to(y1_rows.dtype)
        if hints.shape[2] == 0:
            return y1_rows
        return torch.cat([y1_rows, self.hint_rows(hints, tau).to(y1_rows.dtype)], dim=2)

    def hint_rows(self, hints, tau):
        """e(u, tau) (..., H) of hint uniforms (...): tau a float or a (B,) tensor (one per sequence)."""
        if isinstance(tau, torch.Tensor) and tau.dim() == 1:
            tau = tau.to(hints.device).view(-1, *([1] * (hints.dim() - 1))).expand(hints.shape)
        return self.head.noise(hints, tau)

    def readout_logits(self, hidden):
        """Draft logits from the window rows' hidden states (..., rows, H) -> (..., k-1, V).

        onehot: the hint rows (1..k-1); categorical: every row. Final norm: the head's (head pathway); the
        teacher's for the y1 row and the adapters' for hint rows (trunk pathway); then the teacher's LM head.
        """
        first = 1 if self.head.config.readout == "onehot" else 0
        hidden = hidden[..., first:, :]
        if self.pathway in TRUNK_PATHWAYS:
            return self.head.readout(self.teacher, hidden, self.head.config.exact_rows - first)
        return self.teacher.lm_head(self.head.norm(hidden))

    def draft_logits(self, ids, stream, y1, u, tau):
        """Draft logits for tokens 2..k of every window (training layout), in either pathway.

        Args:
            ids: (B, N) context; stream: `trunk(ids)[0]`, the TokenStream of it (no gradient needed; in the head
                pathway a (B, N, H) features tensor works too).
            y1: (B, W) exact first tokens of the windows anchored at 0..W-1; u: (B, W, k) their uniforms.
            tau: a float or a (B,) tensor.

        Returns:
            (B, W, k-1, V): onehot, logits whose argmax drafts token j+2; categorical, the distribution of
            token j+2 (as logits).
        """
        window_x = self.window_inputs(y1, u, tau)
        if self.pathway in TRUNK_PATHWAYS:
            hidden = self._trunk_window_hidden(ids, stream, window_x)
        else:
            hidden = self._head_window_hidden(ids, stream, window_x)
        return self.readout_logits(hidden)

    def _head_window_hidden(self, ids, stream, window_x):
        """Head pathway: the head's blocks over [context features | window rows] -> (B, W, rows, H)."""
        features = stream.features if isinstance(stream, TokenStream) else stream
        batch, context = ids.shape
        windows, rows = window_x.shape[1], window_x.shape[2]
        x = torch.cat([features.to(window_x.dtype), window_x.flatten(1, 2)], dim=1)
        hidden = run_blocks(self.head.blocks, x, self.staircase_positions(context, windows, rows, ids.device),
                            self.teacher.inv_freq,
                            lambda layer, q, kk, v: kforcing_ops.window_attention(q, kk, v, windows, rows))
        return hidden[:, context:].view(batch, windows, rows, -1)

    def _trunk_window_hidden(self, ids, stream, window_x):
        """Trunk and onepass pathways: window rows through the teacher's blocks with the adapters -> (B, W, rows, H).

        At layer l the window rows attend, with the staircase mask, to [the token stream's keys/values of the
        context at layer l | their own rows]; context rows get zero queries and their outputs are dropped.
        """
        if not isinstance(stream, TokenStream) or stream.keys is None:
            raise ValueError("the trunk pathway needs the TokenStream of student.trunk(ids) (per-layer keys/values)")
        context = ids.shape[1]
        windows, rows = window_x.shape[1], window_x.shape[2]

        def attend(layer, q, k, v):
            context_k, context_v = stream.keys[layer], stream.values[layer]
            q = torch.cat([q.new_zeros(q.shape[0], context, *q.shape[2:]), q], dim=1)
            k = torch.cat([context_k.to(k.dtype), k], dim=1)
            v = torch.cat([context_v.to(v.dtype), v], dim=1)
            return kforcing_ops.window_attention(q, k, v, windows, rows)[:, context:]

        return self.head.run(self.teacher, window_x, self._window_positions(windows, rows, ids.device), attend,
                             n_token=self.head.config.exact_rows)

    def decode_window(self, x, cache):
        """One draft pass in decoding: window rows x (B, rows, H) = [exact token | hints] -> hidden (B, rows, H).

        Row j of sequence b sits at position cache.seqlens[b] + j; nothing is appended to the cache. Head pathway:
        the head's blocks against the head's cache. Trunk pathway: the teacher's blocks with the adapters, each
        layer attending to the teacher's cache of that layer (the exact row with the teacher's weights).
        """
        if self.pathway == "head":
            return decode_blocks(self.head.blocks, x, cache, 0, self.teacher.inv_freq)
        layers = self.teacher.config.n_layer
        if cache.num_layers != layers or cache.batch_size != x.shape[0]:
            raise ValueError(f"the KV cache ({cache.num_layers} layers, {cache.batch_size} sequences) does not fit "
                             f"the teacher ({layers} layers) and {x.shape[0]} sequences")
        positions = cache.seqlens.to(torch.int64)[:, None] + torch.arange(x.shape[1], device=x.device)

        def attend(layer, q, k, v):
            return kforcing_ops.window_attention_decode(q, k, v, cache.k[layer], cache.v[layer], cache.seqlens, 0)

        return self.head.run(self.teacher, x[:, None], positions, attend)[:, 0]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling settings that define the teacher's distribution: what the head learns and what verifies it."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    order: str = "vocab"  # the CDF's token order: "vocab" (ids) or "descending" (probability), both exact

    def __post_init__(self):
        if self.order not in CDF_ORDERS:
            raise ValueError(f"unknown CDF order {self.order!r}; choose one of {CDF_ORDERS}")


def sample_rows(logits, u, sampling: Sampling):
    """Exact tokens (...) from logits (..., V) and uniforms (...) under `sampling`."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    tokens = kforcing_ops.inverse_cdf_sample(flat, u.reshape(-1).contiguous(), sampling.temperature,
                                             sampling.top_k, sampling.top_p, sampling.order)
    return tokens.view(u.shape)


def drafts_from_logits(logits, u, readout, sampling: Sampling):
    """Draft tokens (..., k-1) from head logits (..., k-1, V) and the uniforms (..., k) of tokens 1..k.

    onehot: argmax. categorical: inverse_cdf_sample of each row's distribution with the uniform of its token,
    under the same sampling settings as the teacher (the distribution the head was trained to reproduce).
    """
    if readout == "onehot":
        return logits.float().argmax(-1)
    return sample_rows(logits, u[..., 1:], sampling)


__all__ = ["DraftStudent", "HeadConfig", "HintHead", "PATHWAYS", "READOUTS", "Sampling", "TokenStream", "build_head",
           "drafts_from_logits", "head_class", "sample_rows", "teacher_fingerprint"]
