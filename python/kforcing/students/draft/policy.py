"""Adaptive drafting: how many drafts each verified round makes, so that drafting never costs more than it returns.

A verified round with d drafts yields 1 + (its accepted drafts) tokens; a round with none is a plain AR step (one
teacher row, no draft pass). `DraftPolicy` keeps
  - per sequence, an exponential moving average of each draft offset's cumulative acceptance (drafts 1..j all
    accepted), updated from the verification every drafting round does anyway;
  - per round kind (AR step, drafting round), the round's cost: an exponential moving average of its wall time
    (measured around whole rounds, so it includes everything a round does; a kind's first timing in a request,
    which carries one-off costs, is replaced by its second rather than averaged; once a kind has been timed in a
    run of its own rounds, its first round after a switch, slower with the other kind's weights in the CPU's
    caches, is left out; a round that compiled is left out), or fixed costs given by the caller.
Each round it takes the kind with more expected tokens per unit of cost: the batch's expected tokens per drafting
round, as of the last drafting round, over cost(drafting), against 1 / cost(AR step). A static batch decodes until
its last sequence is done, so the batch's tokens per round are not the mean of its sequences': with r_i tokens left
and t_i = 1 + sum_j acceptance_j expected per drafting round, the batch has max_i r_i rounds left as AR steps and
max_i r_i / t_i drafting, and expects max_i r_i / max_i (r_i / t_i) tokens per drafting round (the slowest
sequence's t_i when the tokens left are not given). Drafting that speeds up most sequences but not the one that
finishes last only adds cost. That expectation still overstates a batch (the last sequence is the unluckiest one,
not the average one), so the policy also measures the batch itself: after each drafting round, how far the most
tokens any sequence has left fell, against what the expectation promises for such a round; the extra tokens
(beyond the exact one) of every drafting count are scaled by the ratio of the two moving averages (`progress`, at
most 1). Drafting is taken only when it beats an AR step by DRAFT_MARGIN (its measured costs are noisy, and part of
what it costs falls outside its rounds). A kind not yet timed is tried first. The kind not taken is tried again
after `explore_every` rounds; each time trying it changes nothing, the interval becomes what keeps exploring at
about EXPLORE_BUDGET of the time (the time an exploration loses against the best kind, over 2% of a best round; from
explore_every up to MAX_BACKOFF x it), so that both estimates follow the text: a kind close to the best keeps being
tried, a hopeless one costs little. Exploring drafting between AR steps also pays the chain head's catch-up over those
steps (measured per step, `catch_up`): when that alone exceeds the budget, the interval is the longest. Acceptance
estimates average their first observations plainly (weight 1/n) before the moving average takes over (weight
`decay`).

When a round's cost grows with its drafts (`per_draft_cost=True`: the chain pathway, one head call per draft), a
drafting round may also make fewer than max_drafts: the policy weighs every count c, (1 + sum_{j<c} acceptance_j)
/ cost(c), with cost(c) measured once c has been taken and, until then, interpolated linearly between the AR step's
cost and the full drafting round's. An exploration of drafting always makes max_drafts, so the acceptance of every
offset stays current; when a count below max_drafts is best, rounds of max_drafts are explored too, every
`interval` rounds, so that their cost (often first measured in one cold round) and the far offsets' acceptance
stay current.

What a request learnt (the costs, the mean acceptance, the exploration interval, the batch's progress and the
catch-up's cost, and how many rounds ago each kind was last taken) is remembered per student, batch size and
compiled or eager rounds for the next request of the process (`finish`, which also times the request's last round),
so a serving loop does not pay to learn again (fixed costs stay fixed: only the acceptance and the interval carry
over), and a kind explored less often than once a request is still explored, every `interval` rounds of the
requests together. The acceptance starts from what the student's distillation measured on held-out text
(`DraftStudent.measured_acceptance`, worth PRIOR_OBSERVATIONS drafting rounds), so a request whose first drafts
happen to fail does not talk the policy out of drafting; without it, from an optimistic every-draft-accepted. For a
batch of one the realised progress factor is 1: a lone sequence's finish moves by exactly its own tokens.

Otherwise two kinds only: while a round is bound by reading weights, fewer drafts cost about as much as k-1 (the
draft pass and the verify pass read the same weights), so when drafting pays, k-1 drafts pay most. Verified output
is the teacher's AR sample whatever the policy chooses; only the speed depends on it.
"""

import dataclasses
import time
import weakref
from typing import Dict, Optional, Sequence

import torch

# The longest exploration interval, in explore_every: 64 x 16 rounds, 16 requests of 64 tokens, so that where
# drafting cannot pay (an exploration after a run of AR steps costs the round and the head's catch-up over the run)
# exploring it costs about 1%.
MAX_BACKOFF = 64
EXPLORE_BUDGET = 0.02  # the share of decoding time that exploring the kind not taken may cost
PROGRESS_DECAY = 0.1  # weight of the newest drafting round in the batch's realised-progress factor (a noisy ratio)
# Drafting is chosen only when its expected tokens per unit of cost beat an AR step's by this share: its costs are
# moving averages of wall time (noisy on a shared machine), and some of what drafting costs falls outside its rounds
# (the head's catch-up after a run of AR steps), so a marginal win measured for drafting is often a loss.
DRAFT_MARGIN = 0.1
# The weight, in drafting rounds, of the acceptance a student's distillation measured, as the prior of a request's
# estimates (a few rounds' 0/1 outcomes are noise: a bad start must not talk the policy out of drafting for good).
PRIOR_OBSERVATIONS = 8


@dataclasses.dataclass
class _Learnt:
    cost: Dict[int, float]
    acceptance: torch.Tensor  # (max_drafts,) mean over the request's sequences
    interval: int
    progress: tuple  # (realised, promised) extra tokens of drafting rounds, moving averages
    catch_up: float  # seconds of the head's catch-up per AR step before a drafting round
    since: Dict[int, int]  # rounds since each kind (AR step, drafting) was last taken, as the request ended


_MEMORY = weakref.WeakKeyDictionary()  # student -> {(batch, max_drafts, compiled): _Learnt}


class DraftPolicy:
    """Chooses 0 or `max_drafts` drafts per round, or any count in between with per_draft_cost (module
    docstring).

    Args:
        batch: sequences in the request.
        max_drafts: drafts of a drafting round (k - 1).
        device: where the acceptance estimates live (the decoder's device).
        costs: None to measure the two kinds' wall time, or fixed (AR step, drafting round) costs in any one unit
            (e.g. AR steps from `bench/bench_decode.py`): reproducible choices.
        explore_every: rounds after which the kind not taken is tried once more (doubling while that changes
            nothing, up to MAX_BACKOFF x).
        decay: weight of the newest observation in the moving averages.
        student: the student decoding (a key for what earlier requests learnt); None: learn from scratch.
        per_draft_cost: a round's cost grows with its drafts (one draft call each): weigh every count.
        compiled: the rounds run compiled (`kforcing.decoding.compiled`): what was learnt is kept apart from
            eager requests', whose rounds cost more.
    """

    def __init__(self, batch: int, max_drafts: int, device, costs: Optional[Sequence[float]] = None,
                 explore_every: int = 16, decay: float = 0.1, student=None, per_draft_cost: bool = False,
                 compiled: bool = False):
        if max_drafts < 1:
            raise ValueError(f"DraftPolicy needs max_drafts >= 1, got {max_drafts}")
        if costs is not None and (len(costs) != 2 or not all(c > 0 for c in costs)):
            raise ValueError(f"costs must be two positive numbers (AR step, drafting round), got {costs!r}")
        if explore_every < 1 or not 0 < decay <= 1:
            raise ValueError(f"explore_every must be >= 1 and decay in (0, 1], got {explore_every} and {decay}")
        self.max_drafts, self.explore_every, self.decay = max_drafts, explore_every, decay
        # The draft counts a drafting round may make.
        self.counts = list(range(1, max_drafts + 1)) if per_draft_cost else [max_drafts]
        self.fixed = costs is not None
        self.cost = {0: costs[0], max_drafts: costs[1]} if costs is not None else {}
        self._timings = {}  # kind -> rounds of it timed in this request
        # The start: the acceptance the student's distillation measured (`DraftStudent.measured_acceptance`), worth
        # PRIOR_OBSERVATIONS drafting rounds, or, unknown, an optimistic one: every draft accepted until the first
        # drafting round, whose outcome then replaces the assumption (later rounds blend in).
        self.acceptance = torch.ones(batch, max_drafts, dtype=torch.float64, device=device)
        self._observations = torch.zeros(batch, max_drafts, dtype=torch.float64, device=device)
        measured = getattr(student, "measured_acceptance", None)
        if measured is not None and len(measured) >= max_drafts:
            self.acceptance[:] = torch.tensor(measured[:max_drafts], dtype=torch.float64, device=device)
            self._observations[:] = PRIOR_OBSERVATIONS
        self._seen = torch.zeros(batch, dtype=torch.bool, device=device)
        self._batch = batch
        self.interval = explore_every
        # Moving averages of the extra tokens (beyond the exact one) drafting rounds moved the batch's finish forward
        # by, and of the extra tokens the expectation promised for them (`_observe_progress`).
        self._realised, self._promised, self._progress_rounds = 0.0, 0.0, 0
        # Seconds per AR step of the catch-up a drafting round after AR steps starts with (a chain head reads the
        # rows of those steps then): left out of the round's cost, it is what exploring drafting costs beyond it.
        self.catch_up, self._steps_behind = 0.0, 0
        self._pending = None  # (drafts, active, tokens left, the most tokens left) as the last drafting round began
        self._key = (batch, max_drafts, compiled)
        self._student = student
        learnt = _MEMORY.get(student, {}).get(self._key) if student is not None else None
        if learnt is not None:  # an earlier request's estimates, as this one's prior
            if not self.fixed:
                self.cost = dict(learnt.cost)
            self.acceptance[:] = learnt.acceptance.to(device)
            self._observations[:] = 1 / self.decay  # a learnt prior: new observations blend in at `decay`
            self._seen[:] = True
            self.interval = learnt.interval
            self._realised, self._promised = learnt.progress
            self._progress_rounds = int(1 / PROGRESS_DECAY)
            self.catch_up = learnt.catch_up
        self.rounds = {count: 0 for count in [0, *self.counts]}  # rounds taken of each count
        # The round index each kind (AR step, drafting) was last taken at; rounds of earlier requests count, so
        # that a kind explored less often than once a request is still explored.
        self._taken_at = {0: 0, max_drafts: 0} if learnt is None else {kind: -since for kind, since in
                                                                         learnt.since.items()}
        self._round = 0
        self._full_taken_at = 0  # the round a drafting round of max_drafts was last taken at
        self._timing = None  # (kind, start time, rounds) of the rounds in progress since the last choice
        self._last_kind = None  # the kind of the last round timed
        self._warm = set()  # kinds timed in a round that followed one of their own (in this request)
        self._explored_from = None  # the best kind before an exploration round, until the next choice
        self._tokens = None  # expected tokens of a round of c drafts (index c), over the sequences last active

    def _cost(self, count) -> float:
        """The measured cost of a round of `count` drafts, or the linear interpolation of the AR step's and the full
        drafting round's."""
        if count in self.cost:
            return self.cost[count]
        share = count / self.max_drafts
        return (1 - share) * self.cost[0] + share * self.cost[self.max_drafts]

    def _expected(self, active, remaining=None):
        """The batch's expected tokens of a round of c drafts (index c), as the acceptance estimates say."""
        if self._tokens is None:  # recomputed after each drafting round only: a host sync a round is not free
            per_sequence = 1.0 + self.acceptance[active].cumsum(dim=1)  # (active, max_drafts): expected tokens
            if remaining is None:
                tokens = per_sequence.min(dim=0).values
            else:  # the batch's rounds left: max_i r_i as AR steps, max_i r_i / t_i drafting
                left = remaining[active].to(per_sequence.dtype).clamp(min=1)[:, None]
                tokens = left.max() / (left / per_sequence).max(dim=0).values
            self._tokens = [1.0, *tokens.tolist()]
        return self._tokens

    @property
    def progress(self) -> float:
        """The share of the extra tokens the expectation promised that drafting rounds really moved the batch's
        finish forward by, at most 1 (1 until measured, and for a batch of one)."""
        if self._batch == 1:  # one sequence: its finish moves by exactly its tokens (no slowest one to wait for)
            return 1.0
        return min(self._realised / self._promised, 1.0) if self._promised > 0 else 1.0

    def _tokens_per_round(self, count) -> float:
        """Expected tokens of a round of `count` drafts, the extra ones scaled by the realised progress factor."""
        return 1.0 + (self._tokens[count] - 1.0) * self.progress

    def _best(self, active, remaining=None) -> int:
        self._expected(active, remaining)
        return max([0, *self.counts], key=lambda count: self._tokens_per_round(count) / self._cost(count)
                   / (1.0 + DRAFT_MARGIN if count else 1.0))

    def _observe_progress(self, most_left: int):
        """Blend in how far the last drafting round moved the batch's finish: the fall of the most tokens any
        sequence has left, against the tokens the expectation promises for such a round (from the acceptance
        estimates as they are now, the round's own outcome included: a promise made with the optimistic start
        would blame the estimates' error on the batch). Sequences finish at different rounds and the batch waits
        for its last, so per-sequence acceptance overstates what drafting buys a batch; `progress` (the ratio of
        the two averages, of the extra tokens beyond the exact one) is measured on the batch itself. The averages
        are of the amounts, not of per-round ratios: a round's realised tokens are a noisy 0/1-like outcome, and
        clamping each ratio would bias the factor down."""
        count, active, remaining, before = self._pending
        self._pending = None
        self._tokens = None
        expected = self._expected(active, remaining)[count]
        self._tokens = None  # the next choice weighs the tokens left now
        self._progress_rounds += 1
        weight = max(1.0 / self._progress_rounds, PROGRESS_DECAY)
        self._realised = (1 - weight) * self._realised + weight * max(before - most_left - 1.0, 0.0)
        self._promised = (1 - weight) * self._promised + weight * max(expected - 1.0, 0.0)

    def _affordable_interval(self, best) -> int:
        """Rounds between explorations such that exploring the other kind (an AR step, or a round of max_drafts)
        costs about EXPLORE_BUDGET of the time: the time one exploration loses against spending it on `best`, over
        EXPLORE_BUDGET x a round of `best`; between explore_every and MAX_BACKOFF x explore_every. Exploring
        drafting between AR steps also costs the catch-up of every step since the last drafting round: a cost per
        round of the interval, which the budget must cover first (when it cannot, the interval is the longest)."""
        other = 0 if best else self.max_drafts
        per_token = self._cost(best) / self._tokens_per_round(best)
        loss = self._cost(other) - self._tokens_per_round(other) * per_token
        spare = EXPLORE_BUDGET * self._cost(best) - (0.0 if best else self.catch_up)
        rounds = loss / spare if spare > 0 else float("inf")
        return int(min(max(rounds, self.explore_every), MAX_BACKOFF * self.explore_every))

    def _end_timing(self, now: float):
        """Blend the round (or run of AR steps) timed since the last choice into its kind's cost."""
        if self._timing is None or self.fixed:
            return
        kind, start, rounds = self._timing
        # A switch is between AR steps and drafting: drafting rounds of any count read the same head weights.
        switched, self._last_kind = self._last_kind is not None and (self._last_kind > 0) != (kind > 0), kind
        # The first round after a round of the other kind runs with that kind's weights in the CPU's caches (a
        # head of a few MB stays cached through a run of drafting rounds, not through AR steps): once a kind has
        # been timed in a run of its own ("warm"), such rounds are left out of its cost, or every exploration would
        # make it look dearer than a run of it is.
        if switched and kind in self._warm:
            return
        seconds = (now - start) / rounds
        # A kind's first timing in a request carries one-off costs (first calls, allocations): the second
        # replaces it rather than blending with it, and so does its first warm timing; later ones blend in.
        seen = self._timings.get(kind, 0)
        first_warm = not switched and seen >= 1 and kind not in self._warm
        if first_warm:
            self._warm.add(kind)
        replace = seen <= 1 or first_warm
        self.cost[kind] = seconds if replace else (1 - self.decay) * self.cost[kind] + self.decay * seconds
        self._timings[kind] = seen + 1

    def choose(self, active: torch.Tensor, remaining: Optional[torch.Tensor] = None) -> int:
        """Drafts for the next round (0, max_drafts or, with per_draft_cost, a count between), given the (B,) mask of
        sequences still decoding and, optionally, the (B,) tokens each has left to make (then the batch's expected
        tokens per round are its rounds left as AR steps over its rounds left drafting; without, the slowest
        sequence's). Also ends the timing of the previous round: call it once per round, at the same point of
        each."""
        now = time.perf_counter()
        self._end_timing(now)
        self._round += 1
        most_left = None
        if remaining is not None and self._pending is not None:
            most_left = int(remaining[active].max())
            self._observe_progress(most_left)
        untimed = [kind for kind in (self.max_drafts, 0) if kind not in self.cost]
        if untimed:
            kind = untimed[0]
        else:
            best = self._best(active, remaining)
            if self._explored_from is not None:  # the last round explored: did it change the choice?
                changed = (best > 0) != (self._explored_from > 0)
                self.interval = self.explore_every if changed else self._affordable_interval(best)
                self._explored_from = None
            other = 0 if best else self.max_drafts
            kind = best
            if self._round - self._taken_at[other] > self.interval:
                kind, self._explored_from = other, best
            elif 0 < best < self.max_drafts and self._round - self._full_taken_at > self.interval:
                # Drafting fewer than max_drafts is best: rounds of max_drafts are explored too, so that their cost
                # (often a first, cold timing) and the far offsets' acceptance stay current.
                kind, self._explored_from = self.max_drafts, best
        if kind == self.max_drafts:
            self._full_taken_at = self._round
        self.rounds[kind] += 1
        if kind:  # the AR steps since the last drafting round: what a catch-up before this one reads
            self._steps_behind = self._round - 1 - self._taken_at[self.max_drafts]
        self._taken_at[self.max_drafts if kind else 0] = self._round
        if kind and remaining is not None:
            most_left = int(remaining[active].max()) if most_left is None else most_left
            self._pending = (kind, active.clone(), remaining.clone(), most_left)
        self._timing = (kind, now, 1)
        return kind

    def restart_timing(self):
        """Start timing the round `choose` just began from now: work done since (a catch-up the round did not
        cause) is left out of its cost, and counted as the catch-up's, per AR step it read."""
        if self._timing is not None:
            kind, start, rounds = self._timing
            now = time.perf_counter()
            if not self.fixed and self._steps_behind > 0:
                per_step = (now - start) / self._steps_behind
                blend = self.decay if self.catch_up else 1.0
                self.catch_up = (1 - blend) * self.catch_up + blend * per_step
            self._timing = (kind, now, rounds)

    def discard_timing(self):
        """Leave the round in progress untimed: it did one-off work that is not the round's cost (a compilation).
        A kind that was never timed is tried again."""
        self._timing = None

    def plain_run(self, limit: int) -> int:
        """After `choose` returned 0: how many AR steps, at most `limit`, the decoder may take in a row before the
        policy wants to choose again (the next exploration of drafting). Counts them as rounds."""
        if self._explored_from is not None:  # an exploration of AR steps while drafting is the choice: one step
            return 1
        due = self._taken_at[self.max_drafts] + self.interval + 1 - self._round
        run = max(1, min(limit, due))
        self.rounds[0] += run - 1
        self._round += run - 1
        self._taken_at[0] = self._round
        if self._timing is not None:
            kind, start, _ = self._timing
            self._timing = (kind, start, run)
        return run

    def observe_acceptance(self, matches: torch.Tensor, active: torch.Tensor):
        """matches (B, c): true where drafts 1..j were all accepted in this drafting round of c drafts (the offsets
        past c keep their estimates); only active sequences' rows count. A few tensor ops with no host sync: it
        runs every drafting round."""
        count = matches.shape[1]
        took_part = active[:, None].to(self.acceptance.dtype)
        observations = self._observations[:, :count]
        observations += took_part
        # The n-th observation of an offset weighs max(decay, 1/n): a plain mean of the first few (a 0/1 outcome
        # is noise), then a moving average. The optimistic start counts as no observation.
        weight = observations.clamp(min=1).reciprocal().clamp(min=self.decay) * took_part
        current = self.acceptance[:, :count]
        current += weight * (matches.to(current.dtype) - current)
        self._seen |= active
        self._tokens = None

    def finish(self):
        """The request is done: time its last round (or run of AR steps), which no later `choose` ends, and keep
        what it learnt (`remember`). A request that ran its last rounds as one run of AR steps would otherwise
        leave the AR step's cost as it was."""
        self._end_timing(time.perf_counter())
        self._timing = None
        self.remember()

    def remember(self):
        """Keep this request's estimates as the prior of the student's next request of this batch size."""
        if self._student is None or len(self.cost) < 2:
            return
        seen = self.acceptance[self._seen]
        acceptance = seen.mean(dim=0) if seen.numel() else self.acceptance.mean(dim=0)
        since = {kind: self._round - taken for kind, taken in self._taken_at.items()}
        _MEMORY.setdefault(self._student, {})[self._key] = _Learnt(dict(self.cost), acceptance.cpu(), self.interval,
                                                                    (self._realised, self._promised), self.catch_up,
                                                                    since)


__all__ = ["DraftPolicy"]
