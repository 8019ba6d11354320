"""Swiss-system tournament over images: one annotator judges side-by-side pairs, round by round.

Each round pairs every item once (one item sits out with a bye when the count is odd) by one maximum-weight
matching over the allowed pairs, as bbpPairings does for the FIDE Dutch rules and as Sauer, Cseh and Lenzner
(arXiv 2112.10522) show ranks better than the official pairing (training_algorithms.md section 3). The rules:

Absolute (a pair that breaks one is not an edge of the matching's graph):
- no rematch;
- at most one bye per item (the bye is an extra vertex that has "met" every item it gave a bye to);
- position balance: an item's (left - right) count stays in {-1, 0, 1} after every round, the way chess
  balances colours; so two items that both owe the same side are never paired. Every item's points (and
  the annotator's position bias) are then spread over left and right within one judgment;
- every round can be paired to the end. For rounds <= safe_rounds(n) = N'/4 + 1 (N' = n rounded up to even)
  this holds for any choice: split the vertices into two halves of N'/2 putting items that owe the right on
  one side, items that owe the left on the other, and the rest (with the bye vertex) evenly; every vertex
  can meet every vertex of the other half except at most r earlier opponents, so at round r < N'/4 + 1 this
  bipartite graph has minimum degree >= N'/4 and, by Hall's theorem, a perfect matching. More rounds (up to
  a round robin, N' - 1) are allowed for n <= LOOKAHEAD_MAX_ITEMS, where each round's matching is kept only
  if an exhaustive search finds pairings for all remaining rounds (else the search's own round is used).

Preferences, in priority order (edge weight = a constant minus a cost whose terms are scaled so that a higher
term always outweighs all lower ones together):
1. the bye goes to the lowest score among the items that have not had one (FIDE);
2. the sum over pairs of the squared score difference (in half points): pair within score groups, float as few
   items as possible, and as short a way as possible;
3. the sum of squared rank differences, ranking by (points, Buchholz, a seeded random pairing number): within
   a group, neighbours meet (the closest calls carry the most information about the order) and a floater
   meets the top of the group below; the bye goes to the lowest-ranked item that has not had one.
Position: an item that owes a side gets it; otherwise the item whose last judgment was on the left goes right
(alternation), and among two fresh items the better ranked is left in even rounds and right in odd ones.
The pairs of a round are listed in a seeded random order, so that an annotator's drift over a round is not
tied to the standings.

Scores: a win is 1 point, a tie 1/2, the bye 1 (the FIDE convention, which moves the lowest item up to meet
stronger ones). The ranking itself (standings(), levels()) is a Bradley-Terry fit on all of the tournament's
judgments (ranking.py), which unlike points accounts for whom an item met; the bye is not a judgment and does
not enter it.

Default rounds: ceil(log2 n), the number of rounds a Swiss needs to single out a winner, capped by the most
rounds allowed. A finer order below the top needs more rounds: with 256 simulated images and 3 annotators,
Kendall tau to the true order was 0.74 after 4 rounds, 0.84 after 8, 0.90 after 16 (docs/swiss_vs_likert.md).

State: a Tournament is fully determined by (item_ids, rounds, seed) and the results recorded. Replaying the
stored judgments round by round (pairings(), then record() for each of its pairs, in any order within the
round) rebuilds the same pairings. A round's pairings are computed once, when the previous round's last
judgment is recorded, and pairings() returns them until the round is complete.

There is no "skip" outcome: a service that lets the annotator skip a pair asks again later (pending() lists
the pairs still open), since an unjudged pair would leave the round incomplete.
"""

from __future__ import annotations

import math
from typing import Hashable, NamedTuple, Sequence

import numpy as np
import rustworkx

from ernie_jax.aesthetics import ranking

OUTCOMES = ("left", "right", "tie")
LOOKAHEAD_MAX_ITEMS = 12
_HALF_POINTS = {"left": (2, 0), "right": (0, 2), "tie": (1, 1)}


class Round(NamedTuple):
    """One round's pairings: `pairs` ((left_id, right_id), ...) and the `bye` item id (None for even n)."""

    pairs: tuple[tuple[Hashable, Hashable], ...]
    bye: Hashable | None


class Standing(NamedTuple):
    """One row of standings(): `rank` (1 = best), the Bradley-Terry `strength`, Swiss `points` (bye
    included), `buchholz` (sum of the points of the items it was judged against), and its judgments."""

    rank: int
    item_id: Hashable
    strength: float
    points: float
    buchholz: float
    wins: int
    ties: int
    losses: int


def _padded(num_items: int) -> int:
    return num_items + num_items % 2


def safe_rounds(num_items: int) -> int:
    """Rounds that any sequence of allowed pairings completes (module docstring), capped by a round robin."""
    return min(_padded(num_items) // 4 + 1, _padded(num_items) - 1)


def max_rounds(num_items: int) -> int:
    """The most rounds a Tournament over `num_items` items accepts."""
    if num_items <= LOOKAHEAD_MAX_ITEMS:
        return _padded(num_items) - 1
    return safe_rounds(num_items)


def default_rounds(num_items: int) -> int:
    """ceil(log2 n), capped by max_rounds(n)."""
    return min(max(1, math.ceil(math.log2(num_items))), max_rounds(num_items))


def _allowed(balance_left: int, balance_right: int) -> bool:
    """Whether an item with balance `balance_left` may take the left next to one with `balance_right`."""
    return balance_left <= 0 and balance_right >= 0


class _Search:
    """Exhaustive search for pairings of the remaining rounds under the absolute rules (small n only).

    Vertices 0..n-1 are items, vertex n the bye when n is odd. `met[v]` is a bitmask of the vertices v has
    met, `balance[v]` its left - right count. A round is a list of (left, right) item pairs plus, for odd n,
    (item, bye_vertex)."""

    def __init__(self, num_items: int):
        self.num_items = num_items
        self.num_vertices = _padded(num_items)
        self.failed: set = set()

    def _options(self, vertex, partners, met, balance):
        """(pair, is_bye) for each allowed pair of `vertex` with one of `partners`, preferred sides first."""
        for other in partners:
            if met[vertex] >> other & 1:
                continue
            if vertex == self.num_items or other == self.num_items:
                yield (min(vertex, other), max(vertex, other)), True
                continue
            for left, right in ((vertex, other), (other, vertex)):
                if _allowed(balance[left], balance[right]):
                    yield (left, right), False

    def plan(self, met, balance, rounds_left, partner_order=None, fixed_pairs=None):
        """The first round of a schedule completing `rounds_left` >= 1 rounds, or None.

        `fixed_pairs`: the first round's pairs, sided as preferred (only the sides are searched);
        `partner_order[v]`: v's partners in order of preference for the first round."""
        partner_of = None if fixed_pairs is None else dict(fixed_pairs)
        return self._round(met, balance, rounds_left, [], frozenset(range(self.num_vertices)), partner_order,
                           partner_of)

    def _round(self, met, balance, rounds_left, chosen, unmatched, partner_order, partner_of):
        if not unmatched:
            if rounds_left == 1:
                return list(chosen)
            key = (tuple(met), tuple(balance))
            if key not in self.failed and self._round(met, balance, rounds_left - 1, [],
                                                      frozenset(range(self.num_vertices)), None, None) is not None:
                return list(chosen)
            self.failed.add(key)
            return None
        if partner_of is not None:
            vertex = min(v for v in unmatched if v in partner_of)
            partners = [partner_of[vertex]]
        else:
            # The most constrained vertex first keeps the search shallow.
            vertex = min(unmatched, key=lambda v: sum(1 for _ in self._options(v, unmatched - {v}, met, balance)))
            partners = partner_order[vertex] if partner_order is not None else sorted(unmatched - {vertex})
        rest = unmatched - {vertex}
        for pair, is_bye in self._options(vertex, [p for p in partners if p in rest], met, balance):
            other = pair[0] if pair[1] == vertex else pair[1]
            new_met = list(met)
            new_met[pair[0]] |= 1 << pair[1]
            new_met[pair[1]] |= 1 << pair[0]
            new_balance = list(balance)
            if not is_bye:
                new_balance[pair[0]] += 1
                new_balance[pair[1]] -= 1
            found = self._round(new_met, new_balance, rounds_left, chosen + [pair], rest - {other}, partner_order,
                                partner_of)
            if found is not None:
                return found
        return None


class Tournament:
    """A Swiss tournament over `item_ids` (distinct hashable ids, at least 2) for `rounds` rounds (None:
    default_rounds(n)), paired deterministically from `seed`. See the module docstring for the rules.

    pairings() -> Round; pending() -> the current round's pairs not yet recorded; record(left, right, outcome)
    with outcome in OUTCOMES ("left": the left image is preferred, "right", "tie"); standings(); levels().
    `round` is the 0-based index of the round being judged (== rounds once done), `done` is True when every
    round is judged. Bad input raises ValueError naming the problem; state is unchanged after an error."""

    def __init__(self, item_ids: Sequence[Hashable], rounds: int | None = None, seed: int = 0):
        self._item_ids = list(item_ids)
        num_items = len(self._item_ids)
        if num_items < 2:
            raise ValueError(f"a tournament needs at least 2 items, got {num_items}")
        try:
            self._index = {item_id: index for index, item_id in enumerate(self._item_ids)}
        except TypeError:
            raise ValueError("item ids must be hashable") from None
        if len(self._index) != num_items:
            seen, duplicates = set(), []
            for item_id in self._item_ids:
                if item_id in seen:
                    duplicates.append(item_id)
                seen.add(item_id)
            raise ValueError(f"item ids must be distinct; repeated: {duplicates[:5]!r}")
        if rounds is None:
            rounds = default_rounds(num_items)
        if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= max_rounds(num_items):
            raise ValueError(f"rounds must be an integer in [1, {max_rounds(num_items)}] for {num_items} items, got {rounds!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._num_items = num_items
        self._rounds = int(rounds)
        self._seed = int(seed)
        self._pairing_number = np.random.default_rng(self._seed).permutation(num_items)
        self._met = np.zeros((num_items, num_items), bool)
        self._had_bye = np.zeros(num_items, bool)
        self._balance = np.zeros(num_items, np.int64)
        self._last_side = np.zeros(num_items, np.int64)  # +1 left, -1 right, 0 not judged yet
        self._half_points = np.zeros(num_items, np.int64)
        self._judgments: list[tuple[int, int, str]] = []
        self._round = 0
        self._current_pairs: list[tuple[int, int]] = []
        self._current_bye: int | None = None
        self._recorded: set[tuple[int, int]] = set()
        self._search = _Search(num_items) if self._rounds > safe_rounds(num_items) else None
        self._pair_round()

    @property
    def item_ids(self) -> list:
        return list(self._item_ids)

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def round(self) -> int:
        return self._round

    @property
    def done(self) -> bool:
        return self._round >= self._rounds

    def pairings(self) -> Round:
        """The current round's pairs (left_id, right_id) and bye; the same until the round is complete."""
        if self.done:
            raise ValueError(f"the tournament has finished all {self._rounds} rounds; there are no pairings")
        ids = self._item_ids
        bye = None if self._current_bye is None else ids[self._current_bye]
        return Round(tuple((ids[left], ids[right]) for left, right in self._current_pairs), bye)

    def pending(self) -> list[tuple[Hashable, Hashable]]:
        """The current round's (left_id, right_id) pairs with no judgment yet (empty once done)."""
        if self.done:
            return []
        ids = self._item_ids
        return [(ids[left], ids[right]) for left, right in self._current_pairs if (left, right) not in self._recorded]

    def judgments(self) -> list[tuple[Hashable, Hashable, str]]:
        """Every recorded (left_id, right_id, outcome), in record order."""
        ids = self._item_ids
        return [(ids[left], ids[right], outcome) for left, right, outcome in self._judgments]

    def record(self, left: Hashable, right: Hashable, outcome: str) -> None:
        """Record the judgment of the current round's pair (left, right); completing the round pairs the next."""
        if self.done:
            raise ValueError(f"the tournament has finished all {self._rounds} rounds; nothing more to record")
        if not isinstance(outcome, str) or outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        for side, item_id in (("left", left), ("right", right)):
            try:
                known = item_id in self._index
            except TypeError:
                known = False
            if not known:
                raise ValueError(f"unknown {side} item id {item_id!r}")
        pair = (self._index[left], self._index[right])
        if pair not in self._current_pairs:
            if pair[::-1] in self._current_pairs:
                raise ValueError(f"({left!r}, {right!r}) is paired the other way round in round {self._round}: "
                                 f"{right!r} is on the left")
            raise ValueError(f"({left!r}, {right!r}) is not a pair of round {self._round}")
        if pair in self._recorded:
            raise ValueError(f"({left!r}, {right!r}) was already recorded in round {self._round}")
        self._recorded.add(pair)
        self._judgments.append((pair[0], pair[1], outcome))
        left_half, right_half = _HALF_POINTS[outcome]
        self._half_points[pair[0]] += left_half
        self._half_points[pair[1]] += right_half
        if len(self._recorded) == len(self._current_pairs):
            self._round += 1
            if not self.done:
                self._pair_round()

    def strengths(self, prior: float = ranking.DEFAULT_PRIOR) -> np.ndarray:
        """Bradley-Terry strengths [n] of the items, in item_ids order, fitted to the judgments so far."""
        return ranking.bradley_terry(self._num_items, self._judgments, prior).scores

    def standings(self, prior: float = ranking.DEFAULT_PRIOR) -> list[Standing]:
        """All items best first by Bradley-Terry strength (ties by points, Buchholz, then item order)."""
        strengths = self.strengths(prior)
        buchholz = self._buchholz_half_points()
        order = np.lexsort((np.arange(self._num_items), -buchholz, -self._half_points, -strengths))
        wins, ties, losses = (np.zeros(self._num_items, np.int64) for _ in range(3))
        for left, right, outcome in self._judgments:
            if outcome == "tie":
                ties[[left, right]] += 1
            else:
                winner, loser = (left, right) if outcome == "left" else (right, left)
                wins[winner] += 1
                losses[loser] += 1
        return [
            Standing(rank + 1, self._item_ids[index], float(strengths[index]), self._half_points[index] / 2,
                     buchholz[index] / 2, int(wins[index]), int(ties[index]), int(losses[index]))
            for rank, index in enumerate(order)
        ]

    def levels(self, num_levels: int = 10, cut_points: Sequence[float] | None = None,
               prior: float = ranking.DEFAULT_PRIOR) -> dict[Hashable, int]:
        """item id -> level in 1..num_levels (num_levels = best): quantile bins of the Bradley-Terry strengths
        (ranking.levels_from_scores; equal-count levels unless `cut_points` are given)."""
        levels = ranking.levels_from_scores(self.strengths(prior), num_levels, cut_points)
        return {item_id: int(level) for item_id, level in zip(self._item_ids, levels, strict=True)}

    def _buchholz_half_points(self) -> np.ndarray:
        buchholz = np.zeros(self._num_items, np.int64)
        for left, right, _ in self._judgments:
            buchholz[left] += self._half_points[right]
            buchholz[right] += self._half_points[left]
        return buchholz

    def _ranks(self) -> np.ndarray:
        """rank [n]: 0 = best by (points, Buchholz, pairing number); integers only, so replays agree exactly."""
        order = np.lexsort((self._pairing_number, -self._buchholz_half_points(), -self._half_points))
        ranks = np.empty(self._num_items, np.int64)
        ranks[order] = np.arange(self._num_items)
        return ranks

    def _pair_round(self) -> None:
        num_items = self._num_items
        ranks = self._ranks()
        points = self._half_points
        left, right = np.triu_indices(num_items, 1)
        balance = self._balance
        keep = ~self._met[left, right] & ~((balance[left] == balance[right]) & (balance[left] != 0))
        left, right = left[keep], right[keep]
        pair_points_cost = (points[left] - points[right]) ** 2
        pair_rank_cost = (ranks[left] - ranks[right]) ** 2
        bye_cost = np.zeros_like(pair_points_cost)
        bye_vertex = num_items if num_items % 2 else None
        if bye_vertex is not None:
            candidates = np.flatnonzero(~self._had_bye)
            left = np.concatenate([left, candidates])
            right = np.concatenate([right, np.full(len(candidates), bye_vertex)])
            bye_cost = np.concatenate([bye_cost, points[candidates] - points[candidates].min()])
            pair_points_cost = np.concatenate([pair_points_cost, np.zeros(len(candidates), np.int64)])
            pair_rank_cost = np.concatenate([pair_rank_cost, (num_items - ranks[candidates]) ** 2])
        # Each term's total over a matching is below the next term's unit, so the terms rank lexicographically.
        # The units outgrow int64 for many rounds at large n, so the weights are Python integers (rustworkx
        # takes 128-bit integer weights).
        pairs_per_round = num_items // 2 + 1
        points_unit = int(pair_rank_cost.max(initial=0)) * pairs_per_round + 1
        bye_unit = points_unit * (int(pair_points_cost.max(initial=0)) * pairs_per_round + 1)
        cost = (bye_cost.astype(object) * bye_unit + pair_points_cost.astype(object) * points_unit
                + pair_rank_cost.astype(object))
        weight = max(cost.max(initial=0), 0) + 1 - cost
        graph = rustworkx.PyGraph()
        graph.add_nodes_from(range(_padded(num_items)))
        graph.add_edges_from(list(zip(left.tolist(), right.tolist(), weight.tolist(), strict=True)))
        matching = rustworkx.max_weight_matching(graph, max_cardinality=True, weight_fn=int)
        pairs = sorted(tuple(sorted(edge)) for edge in matching)
        if len(pairs) != _padded(num_items) // 2:
            raise RuntimeError(f"round {self._round}: no complete pairing exists, which the rules rule out (a bug)")
        sided = [self._sides(first, second, ranks) for first, second in pairs]
        if self._search is not None:
            sided = self._plan_with_lookahead(sided, left, right, weight)
        self._apply_round(sided, bye_vertex)

    def _sides(self, first: int, second: int, ranks: np.ndarray) -> tuple[int, int]:
        """(left, right) for an allowed pair of items, or (item, bye vertex)."""
        if second == self._num_items:
            return first, second
        balance, last = self._balance, self._last_side
        if balance[first] != balance[second]:
            return (first, second) if balance[first] < balance[second] else (second, first)
        if last[first] != last[second]:
            return (first, second) if last[first] < last[second] else (second, first)
        better, worse = (first, second) if ranks[first] < ranks[second] else (second, first)
        return (better, worse) if self._round % 2 == 0 else (worse, better)

    def _plan_with_lookahead(self, sided, left, right, weight) -> list[tuple[int, int]]:
        """The matching's round (its sides as searched) if the remaining rounds can still be paired after it,
        else the first round the search finds, trying partners in order of edge weight."""
        num_vertices = _padded(self._num_items)
        met = [0] * num_vertices
        for first, second in zip(*np.nonzero(self._met), strict=True):
            met[first] |= 1 << int(second)
        for item in np.flatnonzero(self._had_bye):
            met[item] |= 1 << self._num_items
            met[self._num_items] |= 1 << int(item)
        balance = self._balance.tolist() + [0] * (num_vertices - self._num_items)
        rounds_left = self._rounds - self._round
        planned = self._search.plan(met, balance, rounds_left, fixed_pairs=sided)
        if planned is None:
            preference = [[] for _ in range(num_vertices)]
            for edge in np.argsort(-weight, kind="stable"):
                preference[left[edge]].append(int(right[edge]))
                preference[right[edge]].append(int(left[edge]))
            planned = self._search.plan(met, balance, rounds_left, partner_order=preference)
        if planned is None:
            raise ValueError(f"{self._rounds} rounds cannot be paired for {self._num_items} items under the rules")
        return planned

    def _apply_round(self, sided: list[tuple[int, int]], bye_vertex: int | None) -> None:
        pairs, bye = [], None
        for first, second in sided:
            if second == bye_vertex:
                bye = first
            else:
                pairs.append((first, second))
        pair_order = np.random.default_rng([self._seed, self._round]).permutation(len(pairs))
        self._current_pairs = [pairs[index] for index in pair_order]
        self._current_bye = bye
        self._recorded = set()
        for left, right in pairs:
            self._met[left, right] = self._met[right, left] = True
            self._balance[left] += 1
            self._balance[right] -= 1
            self._last_side[left], self._last_side[right] = 1, -1
        if bye is not None:
            self._had_bye[bye] = True
            self._half_points[bye] += 2
