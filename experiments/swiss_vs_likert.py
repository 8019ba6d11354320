"""Experiment D (reference/training_algorithms.md section 9): does a Swiss tournament rank images better than
Likert ratings under annotator offsets, drift and lapses, at an equal budget of judgments?

Noise model: `ernie_jax.aesthetics.simulated_annotators` (one perceptual model for both protocols, so neither
gets an easier annotator: offsets, Likert scales, drift over the session, lapses, position bias), with items of
latent quality q ~ N(0, 1). An annotator's drifting standard that acts on the images differently (a growing
decisiveness, say) is not modelled.
Every method sees the same annotators (offsets, scales, drift paths); each annotator spends the same budget of
B judgments, and their results are combined as the report's protocol does (each annotator on their own, then
aggregated: ernie_jax.aesthetics.ranking.aggregate_annotators for the Bradley-Terry methods; the mean of
per-annotator standardised scores for the others).

Cost: the budget counts judgments, one Likert rating = one pairwise judgment. A pairwise judgment shows two
images and may take longer; `likert_2x` gives Likert twice the judgments, the fair comparison if a pairwise
judgment costs two ratings.

Methods (per annotator, B judgments each):
- likert / likert_2x: each item rated B/N (2B/N) times, in a random order over the session; an item's score is
  its mean rating.
- random_bt: B uniformly random pairs (random sides), Bradley-Terry fit (ernie_jax.aesthetics.ranking).
- elo: the same pairs and judgments in arrival order through Elo (K = 32 on the 400-point scale, the chess
  default, not tuned).
- swiss_bt: ernie_jax.aesthetics.swiss.Tournament with B / (N/2) rounds, judged in its listed order,
  Bradley-Terry fit of its judgments.
- swiss_points: the same tournament ranked by Swiss points, Buchholz breaking ties (option (c) of section 3).
- active_bt: each round, a maximum-weight matching (rustworkx, no rematch, random sides) maximising the summed
  outcome variance p (1 - p) under a Bradley-Terry fit of the judgments so far: the most uncertain pairs.
Metrics against q: Kendall tau and Spearman of the combined scores, deciles of the scores against the deciles of
q (exact and within one level), top-decile precision (|predicted top 10% & true top 10%| / (N / 10)), and the
annotators' mean pairwise Kendall tau with each other. Mean +- std (ddof 0) over seeds; each seed draws its own
items and annotators.

    python -m experiments.swiss_vs_likert --seeds 20 [--out FILE]

`run(small=True)` is the seconds-long version a test runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import rustworkx
from scipy import stats

from ernie_jax.aesthetics import ranking
from ernie_jax.aesthetics.simulated_annotators import (Annotator, NoiseModel, likert_ratings, standardised_mean,
                                                      swiss_tournaments)

METHODS = ("likert", "likert_2x", "random_bt", "elo", "swiss_points", "swiss_bt", "active_bt")
METRICS = ("kendall_tau", "spearman", "level_exact", "level_within_one", "top_decile_precision", "annotator_tau")


@dataclasses.dataclass(frozen=True)
class Settings:
    num_items: int = 256
    num_annotators: int = 3
    rounds: tuple[int, ...] = (4, 8, 16)  # budget per annotator = rounds * N / 2 judgments
    drift_sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # at the middle budget
    absolute_noise_sweep: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)  # at the middle budget
    seeds: int = 20
    noise: NoiseModel = NoiseModel()


SMALL = Settings(num_items=32, num_annotators=2, rounds=(6,), drift_sweep=(0.0, 2.0), absolute_noise_sweep=(3.0,),
                 seeds=3)
SWEEP_METHODS = ("likert", "likert_2x", "random_bt", "swiss_bt")


def _random_pairs(annotators, quality, budget, rng) -> list[list[tuple[int, int, str]]]:
    num_items = len(quality)
    judgments = []
    for annotator in annotators:
        left = rng.integers(0, num_items, budget)
        right = (left + rng.integers(1, num_items, budget)) % num_items
        judgments.append([(int(a), int(b), annotator.choose(rng, quality[a], quality[b])) for a, b in zip(left, right, strict=True)])
    return judgments


def elo_ratings(num_items: int, judgments, k_factor: float = 32.0) -> np.ndarray:
    """Elo ratings [N] after the judgments in arrival order (all start at 0, 400-point logistic scale)."""
    ratings = np.zeros(num_items)
    for left, right, outcome in judgments:
        expected_left = 1 / (1 + 10 ** ((ratings[right] - ratings[left]) / 400))
        score_left = {"left": 1.0, "right": 0.0, "tie": 0.5}[outcome]
        ratings[left] += k_factor * (score_left - expected_left)
        ratings[right] -= k_factor * (score_left - expected_left)
    return ratings


def _active(annotators, quality, rounds, seed) -> list:
    """Each annotator: per round, the no-rematch perfect matching of maximal summed p (1 - p) under BT."""
    num_items = len(quality)
    first, second = np.triu_indices(num_items, 1)
    all_judgments = []
    for index, annotator in enumerate(annotators):
        rng = np.random.default_rng([seed, 2, index])
        met = np.zeros((num_items, num_items), bool)
        judgments = []
        for _ in range(rounds):
            strengths = ranking.bradley_terry(num_items, judgments).scores
            probability = 1 / (1 + np.exp(-(strengths[first] - strengths[second])))
            keep = ~met[first, second]
            # Integer weights for rustworkx; the random last digits break ties between equal variances.
            weight = np.round(probability * (1 - probability) * 1e9).astype(np.int64) * 1000 + rng.integers(0, 1000, len(first))
            graph = rustworkx.PyGraph()
            graph.add_nodes_from(range(num_items))
            graph.add_edges_from(list(zip(first[keep].tolist(), second[keep].tolist(), weight[keep].tolist(), strict=True)))
            pairs = sorted(tuple(sorted(edge)) for edge in rustworkx.max_weight_matching(graph, max_cardinality=True, weight_fn=int))
            for pair_index in rng.permutation(len(pairs)):
                left, right = pairs[pair_index] if rng.random() < 0.5 else pairs[pair_index][::-1]
                met[left, right] = met[right, left] = True
                judgments.append((left, right, annotator.choose(rng, quality[left], quality[right])))
        all_judgments.append(judgments)
    return all_judgments


def _annotator_tau(per_annotator: np.ndarray) -> float:
    taus = [stats.kendalltau(per_annotator[a], per_annotator[b]).statistic
            for a in range(len(per_annotator)) for b in range(a + 1, len(per_annotator))]
    return float(np.mean(taus)) if taus else float("nan")


def metrics(scores: np.ndarray, quality: np.ndarray, per_annotator: np.ndarray) -> dict[str, float]:
    predicted, true = ranking.levels_from_scores(scores), ranking.levels_from_scores(quality)
    decile = len(quality) // 10
    top_predicted, top_true = set(np.argsort(-scores)[:decile]), set(np.argsort(-quality)[:decile])
    return {
        "kendall_tau": float(stats.kendalltau(scores, quality).statistic),
        "spearman": float(stats.spearmanr(scores, quality).statistic),
        "level_exact": float(np.mean(predicted == true)),
        "level_within_one": float(np.mean(np.abs(predicted - true) <= 1)),
        "top_decile_precision": len(top_predicted & top_true) / decile,
        "annotator_tau": _annotator_tau(per_annotator),
    }


def run_seed(settings: Settings, rounds: int, noise: NoiseModel, seed: int, methods=METHODS) -> dict[str, dict]:
    """Every method on one draw of items and annotators; {method: metrics}."""
    num_items = settings.num_items
    budget = rounds * (num_items // 2)
    world = np.random.default_rng([seed, 0])
    quality = world.normal(size=num_items)
    annotator_seeds = world.integers(0, 2**31, settings.num_annotators)

    def annotators(session_length):
        # The same annotators (offset, scale, drift path over their session) for every method.
        return [Annotator(np.random.default_rng(annotator_seed), noise, session_length) for annotator_seed in annotator_seeds]

    cache = {}

    def pairwise(kind):
        # random_bt and elo judge the same pairs; swiss_bt and swiss_points read the same tournaments.
        if kind not in cache:
            if kind == "random":
                cache[kind] = _random_pairs(annotators(budget), quality, budget, np.random.default_rng([seed, 4]))
            elif kind == "swiss":
                cache[kind] = swiss_tournaments(annotators(budget), quality, rounds, seed)
            else:
                cache[kind] = _active(annotators(budget), quality, rounds, seed)
        return cache[kind]

    results = {}
    for method in methods:
        if method in ("likert", "likert_2x"):
            ratings_per_item = budget // num_items * (2 if method == "likert_2x" else 1)
            rng = np.random.default_rng([seed, 3, METHODS.index(method)])
            per_annotator = likert_ratings(annotators(ratings_per_item * num_items), quality, ratings_per_item, rng)
            results[method] = metrics(standardised_mean(per_annotator), quality, per_annotator)
        elif method == "elo":
            per_annotator = np.stack([elo_ratings(num_items, rows) for rows in pairwise("random")])
            results[method] = metrics(standardised_mean(per_annotator), quality, per_annotator)
        elif method == "swiss_points":
            points = pairwise("swiss")[1]
            results[method] = metrics(standardised_mean(points), quality, points)
        else:
            judgments = {"random_bt": lambda: pairwise("random"), "swiss_bt": lambda: pairwise("swiss")[0],
                         "active_bt": lambda: pairwise("active")}[method]()
            aggregate = ranking.aggregate_annotators(num_items, judgments)
            results[method] = metrics(aggregate.scores, quality, aggregate.annotator_scores)
    return results


def _collect(settings: Settings, rounds: int, noise: NoiseModel, methods=METHODS) -> dict[str, dict[str, np.ndarray]]:
    per_seed = [run_seed(settings, rounds, noise, seed, methods) for seed in range(settings.seeds)]
    return {method: {metric: np.array([result[method][metric] for result in per_seed]) for metric in METRICS}
            for method in methods}


def run(settings: Settings | None = None, small: bool = False, log=print) -> dict:
    """{"budget": {rounds: {method: {metric: [seeds]}}}, "drift": {drift: ...}, "absolute_noise": {ratio: ...}}:
    every method at each budget, and SWEEP_METHODS at the middle budget over drift and over the ratio of the
    Likert perception noise to the side-by-side one (module docstring)."""
    settings = settings or (SMALL if small else Settings())
    results = {"budget": {}, "drift": {}, "absolute_noise": {}}
    for rounds in settings.rounds:
        start = time.time()
        results["budget"][rounds] = _collect(settings, rounds, settings.noise)
        log(f"budget {rounds} rounds: {time.time() - start:.1f} s")
    middle = settings.rounds[len(settings.rounds) // 2]
    for sweep, field, values in (("drift", "drift", settings.drift_sweep),
                                 ("absolute_noise", "absolute_noise_ratio", settings.absolute_noise_sweep)):
        for value in values:
            start = time.time()
            noise = dataclasses.replace(settings.noise, **{field: value})
            results[sweep][value] = _collect(settings, middle, noise, SWEEP_METHODS)
            log(f"{field} {value}: {time.time() - start:.1f} s")
    return results


def _cell(values: np.ndarray) -> str:
    return f"{values.mean():.3f} +- {values.std():.3f}"


def tables(results: dict, settings: Settings) -> str:
    lines = []
    for rounds, by_method in results["budget"].items():
        budget = rounds * (settings.num_items // 2)
        lines += [f"Budget {budget} judgments per annotator ({rounds} Swiss rounds, {budget // settings.num_items} "
                  f"Likert ratings per item), drift {settings.noise.drift}:", "",
                  "| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        lines += [f"| {method} | " + " | ".join(_cell(values[metric]) for metric in METRICS) + " |"
                  for method, values in by_method.items()]
        lines.append("")
    middle = settings.rounds[len(settings.rounds) // 2]
    for sweep, title in (("drift", "drift"), ("absolute_noise", "Likert / side-by-side perception noise")):
        lines += [f"{title} at {middle} rounds: Kendall tau (top-decile precision):", "",
                  f"| {title} | " + " | ".join(SWEEP_METHODS) + " |", "|---" * (len(SWEEP_METHODS) + 1) + "|"]
        for value, by_method in results[sweep].items():
            lines.append(f"| {value} | " + " | ".join(
                f"{_cell(by_method[method]['kendall_tau'])} ({by_method[method]['top_decile_precision'].mean():.2f})"
                for method in SWEEP_METHODS) + " |")
        lines.append("")
    return "\n".join(lines)


# The plot's colour of each of METHODS, in order (colour-blind-safe Okabe-Ito palette).
_COLOURS = ("#000000", "#999999", "#e69f00", "#56b4e9", "#009e73", "#d55e00", "#cc79a7")


def _panel(series: dict[str, tuple[list[float], np.ndarray, np.ndarray]], x_label: str, title: str,
           origin: tuple[float, float], size: tuple[float, float], y_range: tuple[float, float]) -> list[str]:
    """SVG elements of one line chart: {method: (x values, mean [X], std [X])} with +- std bars; x on a
    log2 axis at the values given, y linear over `y_range`."""
    (left, top), (width, height) = origin, size
    xs = sorted({x for values, _, _ in series.values() for x in values})
    low, high = np.log2(xs[0]), np.log2(xs[-1])

    def to_x(x):
        return left + (np.log2(x) - low) / max(high - low, 1e-9) * width

    def to_y(y):
        return top + height - (y - y_range[0]) / (y_range[1] - y_range[0]) * height

    elements = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#444"/>',
                f'<text x="{left + width / 2}" y="{top - 10}" text-anchor="middle" font-size="14">{title}</text>',
                f'<text x="{left + width / 2}" y="{top + height + 36}" text-anchor="middle">{x_label}</text>',
                f'<text x="{left - 44}" y="{top + height / 2}" text-anchor="middle" '
                f'transform="rotate(-90 {left - 44} {top + height / 2})">Kendall tau to the true quality</text>']
    for x in xs:
        elements.append(f'<text x="{to_x(x):.1f}" y="{top + height + 18}" text-anchor="middle">{x:g}</text>')
    for tick in np.linspace(*y_range, 6):
        elements.append(f'<line x1="{left}" x2="{left + width}" y1="{to_y(tick):.1f}" y2="{to_y(tick):.1f}" '
                        f'stroke="#ddd"/><text x="{left - 6}" y="{to_y(tick) + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
    for method, (values, means, stds) in series.items():
        colour = _COLOURS[METHODS.index(method)]  # the legend's colour whichever methods a panel shows
        points = " ".join(f"{to_x(x):.1f},{to_y(m):.1f}" for x, m in zip(values, means, strict=True))
        elements.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, m, sd in zip(values, means, stds, strict=True):
            elements.append(f'<line x1="{to_x(x):.1f}" x2="{to_x(x):.1f}" y1="{to_y(m - sd):.1f}" '
                            f'y2="{to_y(m + sd):.1f}" stroke="{colour}"/>'
                            f'<circle cx="{to_x(x):.1f}" cy="{to_y(m):.1f}" r="3" fill="{colour}"/>')
    return elements


def plot(results: dict, settings: Settings) -> str:
    """An SVG figure (no plotting library): Kendall tau (mean +- std over seeds) against the budget per
    annotator for every method, and against the Likert / side-by-side noise ratio at the middle budget."""
    def series(by_value: dict, methods, x_of) -> dict:
        values = list(by_value)
        return {method: ([x_of(v) for v in values],
                         np.array([by_value[v][method]["kendall_tau"].mean() for v in values]),
                         np.array([by_value[v][method]["kendall_tau"].std() for v in values]))
                for method in methods}

    budget = series(results["budget"], METHODS, lambda rounds: rounds * (settings.num_items // 2))
    noise = series(results["absolute_noise"], SWEEP_METHODS, float)
    everything = [m + k * s for panel in (budget, noise) for _, m, s in panel.values() for k in (-1, 1)]
    y_range = (np.floor(min(map(np.min, everything)) * 20) / 20, np.ceil(max(map(np.max, everything)) * 20) / 20)
    middle = settings.rounds[len(settings.rounds) // 2] * (settings.num_items // 2)
    elements = _panel(budget, "judgments per annotator", "every method by budget", (80, 40), (380, 300), y_range)
    elements += _panel(noise, "Likert noise / side-by-side noise", f"at {middle} judgments per annotator",
                       (560, 40), (300, 300), y_range)
    for row, (colour, method) in enumerate(zip(_COLOURS, METHODS, strict=True)):
        elements.append(f'<line x1="890" x2="915" y1="{60 + 20 * row}" y2="{60 + 20 * row}" stroke="{colour}" '
                        f'stroke-width="2"/><text x="922" y="{64 + 20 * row}">{method}</text>')
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="1030" height="400" font-family="sans-serif" '
            'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(elements) + "\n</svg>\n")


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help=f"(default {Settings.seeds}, {SMALL.seeds} with --small)")
    parser.add_argument("--small", action="store_true", help="the seconds-long test version")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    parser.add_argument("--plot", type=Path, help="also write the figure to this SVG file")
    args = parser.parse_args(argv)
    settings = SMALL if args.small else Settings()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        settings = dataclasses.replace(settings, seeds=args.seeds)
    results = run(settings, log=lambda line: print(line, file=sys.stderr))
    text = tables(results, settings)
    print(text)
    if args.out:
        _write(args.out, text + "\n")
    if args.plot:
        _write(args.plot, plot(results, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
