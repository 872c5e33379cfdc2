"""Decoding with a `DraftStudent`: verified (lossless) or unverified, a fixed number of rows per pass (§8).

Each pass runs, with static shapes:

    trunk   the frozen teacher over k rows [c | d_2..d_k]: c, the last exact token, and the drafts that follow it.
            All k rows are appended to the teacher's KV cache; the logits after every row are the teacher's
            exact next-token distributions given the rows before.
    sample  t_j = inverse_cdf_sample(logits after row j, u of position L+1+j), for j = 0..k-1, in one batched call.
    accept  verified: draft d_{j+2} stands while it equals t_j; at the first mismatch the teacher's token t_j
            replaces it. The new tokens t_0..t_a (a = accepted drafts) are exactly what AR sampling with the same
            uniforms produces, so the output equals `generate_ar` token for token. Each sequence's cache length
            moves back to the accepted rows (rows past it are overwritten by the next pass).
            unverified: the k-1 drafts are taken as they are, plus the exact t_{k-1}: k tokens per pass.
    draft   head pathway: commit the k trunk features to the head's KV cache (its length moves back the same
            way), then one head pass over [the new exact token | hints] drafts the next k-1 tokens.
            trunk pathway: one pass of [the new exact token | hints] through the teacher's blocks, the exact row
            with the teacher's weights and the hint rows with the adapters; at every layer the rows attend to
            the teacher's cache of that layer and causally to each other, and append nothing to it (there is
            no second cache).
            chain pathway: the head reads the rows the teacher committed since its last draft (their features and
            the tokens that followed them) in one call, then drafts one token per call from its own feature of the
            row before, each with its position's uniform (`kforcing.students.draft.chain_head`).
            onepass pathway: no pass of its own. The trunk call above also holds, after the k verify rows, one set
            of hint rows for every number a = 0..k-1 of drafts that may stand (Parallel Token Prediction's layout):
            set a sits at L+1+a.., carries the uniforms of its positions, attends to the cache, the verify rows
            0..a and itself, and drafts the k-1 tokens after the teacher's token at L+1+a. The set of the accepted
            count is the next round's drafts, so a round reads the teacher's weights once (the adapters are LoRAs).

Adaptive drafting (verify=True, k=None, the default): each round makes k-1 drafts or none (a chain student may
also make fewer: its round costs one head call per draft), and a round with none is a plain AR step (the teacher
over the exact token alone, no draft pass). `kforcing.students.draft.policy.DraftPolicy` chooses from each sequence's
measured acceptance and the rounds' measured cost, so verified decoding runs at AR's speed when the drafts do not
pay for their pass, and drafts when they do.

Uniforms are `counter_uniform(seed, sequence id, position)` as in `generate_ar`, so AR, verified and unverified
decoding of the same prompt are coupled. Sequences advance at their own rate; the batch keeps its shape until every
sequence has its tokens (or an EOS): the loop is `kforcing.decoding.engine.RoundLoop`, AR's and the push-forward
student's too, and only the round is this module's.

Compiled rounds (compile=True). A drafting round (`_DraftDecoder.drafting_round`: draft, verify pass, sampling,
acceptance, the caches' advance, the head's read of the round's rows, recording the tokens and the statistics)
has static shapes whatever is accepted, and is torch.compile'd as one graph per batch size and draft count, as the
plain AR step is; the loop around it (the policy's choice, the end test) stays eager: a few tensor ops and one host
sync a round.
"""

import dataclasses
from typing import List, Optional, Sequence

import torch

import kforcing_ops
from kforcing_ops import sampling_probabilities
from kforcing_ops.nn import row_invariant_linears

from ...decoding.compiled import compilations, compiled, static_length
from ...decoding.engine import RoundLoop
from ...decoding.prefill import prefill_ragged_prefix, prompt_next_tokens
from ...decoding.request import prompt_batch, uniform_table
from ...decoding.steps import make_cache
from ...models.transformer import KVCache, decode_blocks
from ...teachers.hf_teacher import HFTeacher
from ...teachers.protocol import decode_layers
from .policy import DraftPolicy
from .speculative import speculative_accept
from .student import DraftStudent, Sampling, drafts_from_logits, sample_rows

ACCEPTANCE_RULES = ("coupled", "speculative")
# Keys of speculative sampling's uniform streams (XORed into the seed), apart from every other stream's.
_ACCEPT_KEY, _RESIDUAL_KEY = 0x5EC_ACC, 0x5EC_2E5


@dataclasses.dataclass
class DraftOutput:
    """The result of `generate_with_drafts`.

    Attributes:
        tokens: (B, max_new_tokens) int64; positions after a sequence's EOS hold pad_id.
        lengths: (B,) int64, valid tokens per sequence (up to and including EOS).
        num_passes: forward passes (trunk + head) of the batch, prefill included: until its slowest sequence is
            done.
        tokens_per_pass: each sequence's generated tokens over the passes it took part in (prefill included),
            averaged over the batch (1.0 for AR): the rate of one sequence, whatever the others in its batch do.
        accepted: (k-1,) float: the fraction of verification steps in which drafts 2..j+2 were all accepted
            (over the drafting rounds that made draft j+2).
        ar_rounds: rounds that made no drafts (adaptive drafting's plain AR steps).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    num_passes: int
    tokens_per_pass: float
    accepted: List[float]
    ar_rounds: int = 0

    def tolist(self) -> List[List[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.cpu().tolist())]


class _DraftDecoder:
    """The state of one batched decode: the KV caches, the pending exact token and its drafts.

    Head pathway: the teacher's cache and the head's own cache (the trunk's features of committed tokens).
    Trunk pathway: the teacher's cache only; draft rows read it at every layer and never write to it.
    Chain pathway: the teacher's cache and the head's own cache of (teacher feature, next token) rows: a drafting
    round's rows are read within the round, the prompt's and a run of AR steps' before the next drafting round.
    Onepass pathway: the teacher's cache, and the drafts (and their distributions) the last round made for the next.
    """

    def __init__(self, student: DraftStudent, batch, max_len, seed, sequence_ids, sampling, hint_seed, run_rows,
                 compile=False, set_rows=None, speculative=False):
        """max_len: the rows the teacher's cache needs (rounded up to a length bucket with compile). run_rows: the
        most rows one head call may write past a sequence's length (the longest AR run, read in one call: finished
        sequences' rows are written too, and discarded). compile: run `plain_step` and
        `drafting_round` torch.compile'd (`kforcing.decoding.compiled`). set_rows: onepass pathway, the drafts
        each hint set makes (the most the next round can verify; default max_k - 1). speculative: rounds accept
        by speculative sampling (the onepass pathway then keeps its drafts' distributions)."""
        teacher, config = student.teacher, student.config
        self.student, self.sampling = student, sampling
        self.trunk_cache, _ = make_cache(teacher, batch, max_len, compile)
        max_len = self.trunk_cache.max_len
        # Every uniform the request can use, computed once (`kforcing.decoding.request.uniform_table`): a round
        # gathers its rows instead of hashing them again, three times a round.
        self.u_table = uniform_table(seed, sequence_ids, max_len)
        self.hint_table = (self.u_table if hint_seed is None or hint_seed == seed
                           else uniform_table(hint_seed, sequence_ids, max_len))
        # Speculative sampling's acceptance and residual uniforms: two more streams of the same seed.
        self.accept_table, self.residual_table = (uniform_table(seed ^ key, sequence_ids, max_len)
                                                  for key in (_ACCEPT_KEY, _RESIDUAL_KEY))
        self.head_cache = None
        if student.pathway in ("head", "chain"):
            head_len = static_length(max_len + run_rows) if compile else max_len + run_rows
            self.head_cache = KVCache(student.head_config.num_layers, batch, head_len, config.n_kv_head,
                                      config.head_dim, device=teacher.device, dtype=teacher.dtype)
        # Chain pathway: (teacher features, the tokens that followed them, rows kept) of the prompt or a run of AR
        # steps, which the head has not read yet, and the head's feature at each sequence's last read row (what the
        # next draft chain starts from). A drafting round's own rows are read within the round.
        self.pending, self.chain_feature = [], None
        # The chain head's readout layer, looked up before any compiled round (`ChainHead.apply_readout`).
        self.readout_layer = student.head.readout_layer(teacher) if student.pathway == "chain" else None
        # Onepass pathway: the drafts the last round's hint sets made for the next round, and their distributions
        # (speculative sampling). After the prompt or a run of AR steps there are none: the next round verifies
        # stand-ins (token 0, a point mass), which stand only where they are the teacher's token, so the output
        # stays exact; that round's own hint sets then draft for the one after.
        self.set_rows = student.max_k - 1 if set_rows is None else set_rows
        self.next_drafts = self.next_q = None
        # whether the next round's drafts were drafted (False while they are stand-ins)
        self.drafted = True
        if student.pathway == "onepass":
            self.next_drafts = torch.zeros(batch, self.set_rows, dtype=torch.int64, device=teacher.device)
            if speculative:
                self.next_q = torch.zeros(batch, self.set_rows, config.vocab_size, dtype=torch.float64,
                                          device=teacher.device)
            self.forget_drafts()
        self._plain_step = compiled(type(self).plain_step) if compile else type(self).plain_step
        self._drafting_round = compiled(type(self).drafting_round) if compile else type(self).drafting_round

    @property
    def draft_cache(self):
        """The cache the draft rows attend to; its length is the position of the pending exact token."""
        return self.trunk_cache if self.head_cache is None else self.head_cache

    def uniforms(self, positions, table=None):
        """The decoding seed's uniforms (or `table`'s) at positions (B, T) of each sequence."""
        return (self.u_table if table is None else table).gather(1, positions)

    def trunk(self, ids, logits="all"):
        """Append ids (B, T) to the teacher's cache: (features, the exact logits after every row ("all"), after the
        last row only ("last": a prefill needs one row's, and the vocabulary projection of every prompt row would
        cost as much as several decode steps), or None)."""
        teacher = self.student.teacher
        features = decode_layers(teacher, teacher.embed(ids), self.trunk_cache, ids.shape[1])
        if logits is None:
            return features, None
        return features, teacher.logits(features if logits == "all" else features[:, -1:])

    def forget_drafts(self):
        """Onepass pathway: the next round's drafts become stand-ins (token 0, drawn from a point mass at 0), as
        after the prompt or a run of AR steps, when no hint set drafted for the next round's positions."""
        if self.next_drafts is not None:
            self.next_drafts.zero_()
            self.drafted = False
        if self.next_q is not None:
            self.next_q.zero_()
            self.next_q[..., 0] = 1.0

    def plain_step(self, exact, position):
        """One AR step from the exact tokens (B,) sampling the tokens at `position` (B, 1): (the teacher's features
        of the new row (B, 1, H), the next exact tokens (B,)). Static shapes: compiled as a whole with compile."""
        features, logits = self.trunk(exact[:, None])
        return features, sample_rows(logits, self.uniforms(position), self.sampling)[:, 0]

    def ar_steps(self, exact, active, steps, eos_id):
        """`steps` plain AR steps from the exact tokens (B,): (tokens (B, steps), keep (B, steps)), keep False from a
        sequence's EOS on and for inactive sequences, whose caches do not advance. A tight loop with no host sync:
        per step one teacher row, one sampler call and a few tensor ops."""
        tokens = exact.new_empty((exact.shape[0], steps))
        keep = active[:, None].repeat(1, steps)
        seqlens = self.trunk_cache.seqlens
        position = seqlens.to(torch.int64)[:, None] + 1  # of the token each step samples
        inactive, advance = (~active).int(), active.long()[:, None]
        features = []
        for s in range(steps):
            step_features, exact = self._plain_step(self, exact, position)
            features.append(step_features)
            tokens[:, s] = exact
            seqlens.sub_(inactive)  # the step appended a row to every sequence: inactive ones take it back
            position.add_(advance)
            if eos_id is not None:  # from a sequence's EOS on, its caches stop and its tokens are not kept
                active = active & (exact != eos_id)
                inactive, advance = (~active).int(), active.long()[:, None]
                keep[:, s + 1:] &= active[:, None]
        # Kept steps are a prefix of each sequence's run, so the head reads the whole run in one call.
        self.commit_features(torch.cat(features, dim=1), tokens, keep.long().sum(dim=1))
        self.forget_drafts()
        return tokens, keep

    def run_drafting_round(self, exact, active, count: int, verify: bool, speculative: bool, loop: RoundLoop,
                           statistics):
        """`drafting_round`, compiled with compile=True. A onepass round whose drafts are stand-ins verifies them
        even unverified (a stand-in is no draft to keep), and is left out of the acceptance statistics and of
        what adaptive drafting learns (it returns no matches): it is an AR step that drafts for the next round."""
        stand_ins = not self.drafted
        out = self._drafting_round(self, exact, active, count, verify or stand_ins, speculative, loop,
                                   None if stand_ins or not verify else statistics)
        self.drafted = True
        return out

    def drafting_round(self, exact, active, count: int, verify: bool, speculative: bool, loop: RoundLoop,
                       statistics):
        """One drafting round from the exact tokens (B,): `count` drafts, the teacher over [exact | drafts], the new
        tokens and how many drafts stand; the caches advance by each active sequence's new tokens, and `loop`
        records them. Static shapes (whatever is accepted), so that compile=True compiles the round as a whole,
        its bookkeeping included.

        statistics: (accepted (k-1,), verification steps (k-1,)) float64 sums per draft offset, added to; None: the
            round is not measured.
        Returns (the next exact tokens (B,), the (B, count) bool of active sequences whose drafts 1..j were all
        accepted, or None unverified or unmeasured)."""
        start = self.trunk_cache.seqlens.to(torch.int64)
        sampling = self.sampling
        one_pass = self.student.pathway == "onepass"
        if one_pass:  # the last round drafted these; this call drafts the next round's
            drafts = self.next_drafts[:, :count]
            q = self.next_q[:, :count] if speculative else None
            features, logits, hint_logits = self.one_pass(exact, drafts)
        else:
            if speculative:
                drafts, q = self.draft(exact, count, distributions=True)
            else:
                drafts = self.draft(exact, count)
            features, logits = self.trunk(torch.cat([exact[:, None], drafts], dim=1))
        rows = torch.arange(count + 1, device=start.device)
        positions = start[:, None] + 1 + rows
        if speculative:
            new_tokens, n_accepted = speculative_accept(
                _probabilities(logits, sampling), q, drafts, self.uniforms(positions[:, :-1], self.accept_table),
                self.uniforms(positions, self.residual_table))
        else:
            teacher_tokens = sample_rows(logits, self.uniforms(positions), sampling)
            if verify:  # coupled: drafts stand while they equal the teacher's tokens
                new_tokens = teacher_tokens
                n_accepted = (drafts == teacher_tokens[:, :-1]).long().cumprod(dim=1).sum(dim=1)
            else:  # the drafts as they are, and the teacher's token after the last
                new_tokens = torch.cat([drafts, teacher_tokens[:, -1:]], dim=1)
                n_accepted = torch.full_like(start, count)
        # A sequence that is done stays where it is (its cache never grows past its tokens + k rows).
        advance = torch.where(active, 1 + n_accepted, 0)
        self.trunk_cache.seqlens.copy_(start + advance)
        if one_pass:
            self.keep_next_drafts(hint_logits, n_accepted, start, speculative)
        self.commit_features(features, new_tokens, advance, by_drafting_round=True)
        matches = None
        if verify and statistics is not None:
            matches = (rows[None, :count] < n_accepted[:, None]) & active[:, None]
            accepted, steps = statistics
            accepted[:count] += matches.sum(dim=0)
            steps[:count] += active.sum()
        loop.record(new_tokens, advance, active, took_part=active.long())
        return new_tokens.gather(1, n_accepted[:, None])[:, 0], matches

    def one_pass(self, exact, drafts):
        """Onepass pathway: one teacher call over the verify rows [exact | drafts] (B, V = count + 1) at positions
        L..L+count (L: each sequence's cache length), appended to the teacher's cache as `trunk` appends them, and
        the hint sets a = 0..count of set_rows rows each at L+1+a.., each attending to the cache, the verify rows
        0..a and itself causally (what the cache will hold if a drafts stand). Verify rows run the teacher's weights
        and hint rows the adapters (a LoRA shares the teacher's read of every weight).

        Returns (the verify rows' features (B, V, H), their exact logits (B, V, vocab), the hint rows' draft
        logits (B, V, set_rows, vocab): set a's row j gives the distribution of the token at L+2+a+j)."""
        student = self.student
        teacher, head, cache = student.teacher, student.head, self.trunk_cache
        batch, n_verify, rows = exact.shape[0], drafts.shape[1] + 1, self.set_rows
        start = cache.seqlens.to(torch.int64)[:, None]
        offsets = torch.arange(n_verify, device=exact.device)
        hint_offsets = (offsets[:, None] + 1 + torch.arange(rows, device=exact.device)).flatten()
        hints = self.uniforms(start + hint_offsets, self.hint_table)
        x = torch.cat([teacher.embed(torch.cat([exact[:, None], drafts], dim=1)),
                       student.hint_rows(hints, self.sampling.temperature).to(teacher.dtype)], dim=1)
        positions = torch.cat([start + offsets, start + hint_offsets], dim=1)
        # each set sees the cache up to its own accepted prefix: L + 1 + a rows once the verify rows are written
        set_lengths = [cache.seqlens + (1 + a) for a in range(n_verify)]

        def attend(layer, q, k, v):
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            out = [kforcing_ops.window_attention_decode(q[:, :n_verify], k[:, :n_verify], v[:, :n_verify], k_cache,
                                                        v_cache, cache.seqlens, n_verify)]
            for a, lengths in enumerate(set_lengths):
                part = slice(n_verify + a * rows, n_verify + (a + 1) * rows)
                out.append(kforcing_ops.window_attention_decode(q[:, part], k[:, part], v[:, part], k_cache, v_cache,
                                                                lengths, 0))
            return torch.cat(out, dim=1)

        hidden = head.run(teacher, x[:, None], positions, attend, n_token=n_verify)[:, 0]
        logits = head.readout(teacher, hidden, n_verify)  # one LM-head call for every row
        return (hidden[:, :n_verify], logits[:, :n_verify],
                logits[:, n_verify:].view(batch, n_verify, rows, logits.shape[-1]))

    def keep_next_drafts(self, hint_logits, n_accepted, start, speculative):
        """Onepass pathway: the next round's drafts are the hint set of the accepted count, each sampled with its
        position's uniform (L+2+a+j for row j of set a), with their distributions for speculative sampling."""
        batch, _, rows, vocab = hint_logits.shape
        chosen = hint_logits.gather(1, n_accepted.view(-1, 1, 1, 1).expand(batch, 1, rows, vocab))[:, 0]
        positions = (start + 2 + n_accepted)[:, None] + torch.arange(rows, device=start.device)
        self.next_drafts.copy_(sample_rows(chosen, self.uniforms(positions), self.sampling))
        if speculative:
            self.next_q.copy_(_probabilities(chosen, self.sampling))

    def commit_features(self, features, next_tokens, keep, by_drafting_round=False):
        """Hand the head the trunk's features (B, T, H) of rows the teacher has just committed, with the tokens
        that followed them (B, T); each sequence keeps only its first `keep` rows.

        Head pathway: append the features to the head's cache. Chain pathway: a drafting round's rows are read at
        once (the next round drafts from them); the prompt's and a run of AR steps' are queued, and the head reads
        them before its next draft chain (`catch_up`), so AR steps cost no head call. Trunk pathway: nothing to do
        (the teacher's cache is all the draft rows read)."""
        if self.head_cache is None:
            return
        if self.student.pathway == "chain":
            if by_drafting_round:
                self._read_rows(features, next_tokens, keep)
            else:
                self.pending.append((features, next_tokens, keep))
            return
        start = self.head_cache.seqlens.clone()
        decode_blocks(self.student.head.blocks, features, self.head_cache, features.shape[1],
                      self.student.teacher.inv_freq)
        self.head_cache.seqlens.copy_(start + keep.to(torch.int32))

    def _read_rows(self, features, next_tokens, keep):
        """Chain pathway: one head call over committed rows (features (B, T, H), the tokens that followed them) into
        its cache, each sequence keeping its first `keep` rows; `chain_feature` becomes the head's feature at each
        sequence's last kept row (unchanged where it keeps none)."""
        head, teacher = self.student.head, self.student.teacher
        start = self.head_cache.seqlens.clone()
        hidden = head.decode(teacher, features, next_tokens, self.head_cache, features.shape[1])
        self.head_cache.seqlens.copy_(start + keep.to(torch.int32))
        last = hidden.gather(1, (keep - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))[:, 0]
        self.chain_feature = last if self.chain_feature is None else torch.where(
            (keep > 0)[:, None], last, self.chain_feature)

    def catch_up(self) -> bool:
        """Chain pathway: read the rows queued by the prompt or a run of AR steps (one head call per queued pass),
        before a drafting round and apart from it (whose cost adaptive drafting measures: a catch-up that grows with
        the AR steps before it would make drafting look dearer the longer it was not taken). True when there was
        something to read."""
        if not self.pending:
            return False
        for features, next_tokens, keep in self.pending:
            self._read_rows(features, next_tokens, keep)
        self.pending.clear()
        return True

    def _chain_drafts(self, count, distributions):
        """Chain pathway: `count` drafts, each sampled from the head's distribution with its position's uniform,
        each fed back as the next head row (one one-row head call per draft after the first); the chain's rows
        leave the head's cache as they came."""
        student, sampling = self.student, self.sampling
        head, teacher = student.head, student.teacher
        feature = self.chain_feature  # the queued rows are read first (`catch_up`)
        start = self.head_cache.seqlens.clone()
        positions = self.trunk_cache.seqlens.to(torch.int64)[:, None] + 1 + torch.arange(count, device=start.device)
        u = self.uniforms(positions)
        drafts, distributions_ = [], []
        for j in range(count):
            logits = head.apply_readout(teacher, self.readout_layer, feature[:, None])
            draft = head.token_ids(sample_rows(logits, u[:, j:j + 1], sampling))
            drafts.append(draft)
            if distributions:
                distributions_.append(head.full_distribution(_probabilities(logits, sampling)))
            if j + 1 < count:
                feature = head.decode(teacher, feature[:, None], draft, self.head_cache, 1)[:, 0]
        self.head_cache.seqlens.copy_(start)
        drafts = torch.cat(drafts, dim=1)
        return (drafts, torch.cat(distributions_, dim=1)) if distributions else drafts

    def draft(self, exact, count, distributions=False):
        """Drafts (B, count) of the tokens after `exact` (B,), the token at each sequence's draft-cache length:
        a window of count + 1 rows (hint i only sees hints 0..i, so fewer rows than k draft the same tokens).
        distributions: also return the (B, count, V) float64 distributions the drafts were drawn from (a point
        mass at the argmax for the onehot readout)."""
        student = self.student
        if student.pathway == "chain":
            return self._chain_drafts(count, distributions)
        cache = self.draft_cache
        position = cache.seqlens.to(torch.int64)[:, None]
        positions = position + torch.arange(count + 1, device=exact.device)
        u = self.uniforms(positions)  # u of exact, then of the drafts
        hints = self.uniforms(positions, self.hint_table)
        sampling = self.sampling
        x = student.window_inputs(exact[:, None], hints[:, None], sampling.temperature)[:, 0]
        logits = student.readout_logits(student.decode_window(x, cache))
        drafts = drafts_from_logits(logits, u, student.head_config.readout, sampling)
        if not distributions:
            return drafts
        if student.head_config.readout == "onehot":
            q = torch.nn.functional.one_hot(drafts, logits.shape[-1]).double()
        else:
            q = _probabilities(logits, sampling)
        return drafts, q


def _probabilities(logits, sampling):
    """The float64 distributions (..., V) that `sample_rows` draws from, for logits (..., V)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return sampling_probabilities(flat, sampling.temperature, sampling.top_k, sampling.top_p).view(logits.shape)


@torch.no_grad()
def generate_with_drafts(student: DraftStudent, prompts, max_new_tokens: int, k: Optional[int] = None,
                         seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, *,
                         verify: bool = True, eos_id: Optional[int] = None, pad_id: int = 0,
                         sequence_ids=None, hint_seed: Optional[int] = None, order: str = "vocab",
                         round_costs: Optional[Sequence[float]] = None, acceptance: str = "coupled",
                         compile: bool = False) -> DraftOutput:
    """Decode with a DraftStudent: lossless with verify=True, k tokens per pass without.

    Args:
        student: a DraftStudent (teacher-exact token rows and a hint head).
        prompts, max_new_tokens, seed, temperature, top_k, top_p, eos_id, pad_id, sequence_ids: as in
            `kforcing.decoding.generate.generate_ar`; temperature must be a float here.
        k: rows per pass, 2 <= k <= student.max_k: the exact token and k-1 drafts in every round. None (the
            default): adaptive drafting with up to max_k - 1 drafts when verifying (`kforcing.students.draft.policy`):
            each round drafts k-1 tokens or none (a plain AR step), whichever is expected to give more tokens per unit
            of cost, so verified decoding is not slower than AR when the drafts do not pay; without verification, max_k.
        verify: True: every draft is checked against the teacher's own token under the same uniform, and the
            output equals `generate_ar(student.teacher, ...)` token for token. False: drafts are kept as they
            are (k tokens per pass, the student's own distribution).
        order: the CDF's token order ("vocab" or "descending"), as in `generate_ar`; a head learns one of them.
        hint_seed: a diagnostic (the u-shuffle test): the hint rows carry uniforms drawn from this seed instead of
            the decoding seed, while the teacher and a categorical readout still sample with the decoding seed's.
            Verified output stays exact; the acceptance shows how much the drafts owe to the right uniforms.
        round_costs: adaptive drafting only: fixed (AR step, drafting round) costs instead of measured wall times
            (reproducible choices; see `DraftPolicy`).
        acceptance: how verification keeps drafts. "coupled" (default): a draft stands when it equals the teacher's
            token under the same uniform, so the output equals `generate_ar`'s token for token. "speculative":
            speculative sampling (`kforcing.students.draft.speculative`): lossless in distribution (every token is
            distributed as the teacher's sample), not equal to `generate_ar`'s.
        compile: torch.compile the drafting round and the plain AR step as wholes (static shapes; one compilation
            per process, batch size and draft count), as `generate_ar(compile=True)` compiles AR's step. The
            output is the same; compare speeds compiled against compiled. kforcing ARModel teachers only.

    Returns:
        DraftOutput(tokens, lengths, num_passes, tokens_per_pass, accepted per draft offset).
    """
    if not isinstance(student, DraftStudent):
        raise TypeError(f"generate_with_drafts needs a DraftStudent, got {type(student).__name__}")
    if acceptance not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance must be one of {ACCEPTANCE_RULES}, got {acceptance!r}")
    if acceptance == "speculative" and not verify:
        raise ValueError("acceptance='speculative' is a verification rule: it needs verify=True")
    if hint_seed is not None and student.pathway == "chain":
        raise ValueError("hint_seed moves the hint rows' uniforms; a chain student has no hint rows (its drafts are "
                         "sampled with the decoding seed's uniforms)")
    if compile and isinstance(student.teacher, HFTeacher):
        raise ValueError("compile is for draft students of kforcing's own ARModel teachers; decode a Hugging Face "
                         "teacher's student without it")
    speculative = acceptance == "speculative"
    adaptive = k is None and verify
    if round_costs is not None and not adaptive:
        raise ValueError("round_costs applies to adaptive drafting only (verify=True and k=None)")
    k = student.max_k if k is None else k
    if not isinstance(k, int) or not 2 <= k <= student.max_k:
        raise ValueError(f"k={k!r} is not allowed: this student drafts with 2 <= k <= max_k={student.max_k}")
    prompts = prompt_batch(student.teacher, prompts, max_new_tokens, sequence_ids, eos_id, pad_id)
    device, batch, lengths = student.device, prompts.batch, prompts.lengths
    sampling = Sampling(float(temperature), top_k, top_p, order)
    cache_len = int(lengths.max()) + max_new_tokens + 2 * student.max_k
    decoder = _DraftDecoder(student, batch, cache_len, seed, prompts.sequence_ids, sampling, hint_seed,
                            max_new_tokens, compile, set_rows=k - 1, speculative=speculative)

    # Prefill: the prompts through the teacher as `generate_ar` runs them (`kforcing.decoding.prefill`: the cache
    # holds the same bits), each pass's features into the head's cache.
    prefix_passes, prefix = prefill_ragged_prefix(lambda ids: decoder.trunk(ids, logits=None),
                                                  decoder.trunk_cache.seqlens, prompts, pad_id)
    features, last = decoder.trunk(prompts.tail, logits="last")
    exact = sample_rows(last, decoder.uniforms(lengths[:, None]), sampling)[:, 0]
    after_prefix, after_tail = prompt_next_tokens(prompts, 0 if prefix is None else prefix[0].shape[1], exact)
    if prefix is not None:
        decoder.commit_features(prefix[0], after_prefix, lengths - prompts.tail.shape[1])
    decoder.commit_features(features, after_tail, torch.full_like(lengths, prompts.tail.shape[1]))
    policy = DraftPolicy(batch, k - 1, device, round_costs, student=student,
                         per_draft_cost=student.pathway == "chain", compiled=compile) if adaptive else None

    # Sized by max_k rather than k, so that a pinned k and adaptive drafting share compiled graphs.
    loop = RoundLoop(batch, max_new_tokens, eos_id, pad_id, student.max_k, device)
    loop.count_passes(prefix_passes + 1)  # the prefill
    loop.record(exact[:, None], torch.ones_like(lengths), torch.ones_like(exact, dtype=torch.bool))
    accepted = torch.zeros(student.max_k - 1, dtype=torch.float64, device=device)
    steps = torch.zeros_like(accepted)  # verification steps that made each offset
    with row_invariant_linears():  # every round's rows get the bits of AR's one-row steps over them
        while True:
            active = loop.active()
            if loop.done(active):
                break
            # drafts this round (0: an AR step), weighing what the batch has left to make
            left = max_new_tokens - loop.produced
            count = policy.choose(active, left) if policy is not None else k - 1
            if count and decoder.catch_up() and policy is not None:
                policy.restart_timing()  # the catch-up is not part of the drafting round's cost
            graphs = compilations() if compile else 0
            if count == 0:  # plain AR steps, as many as the policy allows before it wants to choose again (the run
                # advances the caches itself)
                run = policy.plain_run(int(left[active].min()))
                new_tokens, keep = decoder.ar_steps(exact, active, run, eos_id)
                advance = keep.long().sum(dim=1)
                # with fresh strides, as a drafting round's (a compiled step's graph is specialised to its inputs'
                # strides)
                exact = new_tokens[:, -1].clone(memory_format=torch.contiguous_format)
                loop.count_passes(run, advance)  # a sequence takes part in the steps it keeps
                loop.record(new_tokens, advance, active)
            else:  # the round records its tokens and statistics itself (inside its compiled graph)
                exact, matches = decoder.run_drafting_round(exact, active, count, verify, speculative, loop,
                                                            (accepted, steps))
                loop.count_passes(1, 0)
                if policy is not None and matches is not None:
                    policy.observe_acceptance(matches, active)
            if policy is not None and compile and compilations() != graphs:
                policy.discard_timing()  # this round compiled: its wall time is not what such a round costs
    if policy is not None:
        policy.finish()
    tokens, out_lengths, passes, rate = loop.result()
    return DraftOutput(tokens, out_lengths, passes, rate,
                       (accepted / steps.clamp(min=1))[:k - 1].tolist() if verify else [],
                       policy.rounds[0] if policy is not None else 0)


__all__ = ["ACCEPTANCE_RULES", "DraftOutput", "generate_with_drafts"]
