"""Time per Swiss round (ernie_jax.aesthetics.swiss) at 1,000 items, and the Bradley-Terry fit behind
standings(); optionally one round's matching by networkx for comparison. Nothing here is asserted.

    python benchmarks/swiss_pairing.py [--items 1000] [--rounds 10] [--networkx]

(A minute or so; --networkx adds one complete-graph matching by each library, which took networkx 13 minutes
at 1,000 nodes. Results: docs/swiss_vs_likert.md.)

A simulated annotator judges each round (P(left) = sigmoid(2 (q_left - q_right))); the time of a round is the
time of the record() call that completes the previous one (which computes the pairing), and of the
constructor for round 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernie_jax.aesthetics import metrics, swiss  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--networkx", action="store_true", help="also time networkx on the last round's graph")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    quality = rng.normal(size=args.items)
    start = time.perf_counter()
    tournament = swiss.Tournament(list(range(args.items)), args.rounds, seed=0)
    seconds = [time.perf_counter() - start]
    while not tournament.done:
        pending = tournament.pending()
        for left, right in pending:
            preferred_left = rng.random() < 1 / (1 + np.exp(-2 * (quality[left] - quality[right])))
            start = time.perf_counter()
            tournament.record(left, right, "left" if preferred_left else "right")
        seconds.append(time.perf_counter() - start)
    seconds = seconds[:-1]  # the last record() completes the tournament and pairs nothing
    print(f"{args.items} items, {args.rounds} rounds: seconds per round " + " ".join(f"{value:.2f}" for value in seconds))
    print(f"mean {np.mean(seconds):.2f} s, max {np.max(seconds):.2f} s")
    start = time.perf_counter()
    standings = tournament.standings()
    print(f"standings() (Bradley-Terry fit of {len(tournament.judgments())} judgments): "
          f"{time.perf_counter() - start:.3f} s")
    strengths = np.array([row.strength for row in sorted(standings, key=lambda row: row.item_id)])
    print(f"Kendall tau of the fit to the simulated quality: {metrics.kendall_tau_b(strengths, quality):.3f}")
    if args.networkx:
        import networkx
        import rustworkx

        first, second = np.triu_indices(args.items, 1)
        weights = np.random.default_rng(1).integers(1, 10**6, len(first)).tolist()
        edges = list(zip(first.tolist(), second.tolist(), weights, strict=True))
        for name, graph, match in (
            ("rustworkx", rustworkx.PyGraph(), lambda graph: rustworkx.max_weight_matching(
                graph, max_cardinality=True, weight_fn=int)),
            ("networkx", networkx.Graph(), lambda graph: networkx.max_weight_matching(graph, maxcardinality=True)),
        ):
            if name == "rustworkx":
                graph.add_nodes_from(range(args.items))
                graph.add_edges_from(edges)
            else:
                graph.add_weighted_edges_from(edges)
            start = time.perf_counter()
            match(graph)
            print(f"{name} max_weight_matching, complete graph of {args.items} nodes, random integer weights: "
                  f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
