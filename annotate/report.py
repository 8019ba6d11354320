"""`status` and `export`: each annotator's progress, calibration and ranking, and the campaign's levels.

Calibration has two measures per annotator: agreement with gold (the share of gold pairs judged for the known
winner, a tie counting 1/2) and agreement with the other annotators (the mean Kendall tau-b between this
annotator's Bradley-Terry strengths and each other annotator's). Gold pairs never enter a tournament.
Levels 1..10 (10 = best) are quantile bins of Bradley-Terry strengths (ranking.levels_from_scores); the
aggregated level bins the mean of the annotators' standardised strengths (ranking.aggregate_annotators).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotate.errors import AnnotateError
from annotate.judging import Progress, read_progress, replay_tournament
from annotate.models import Annotator, Campaign, GoldPair, Image, Judgment, Pair
from ernie_jax.aesthetics import metrics, ranking
from ernie_jax.aesthetics.swiss import Tournament

NUM_LEVELS = 10
NUM_BOOTSTRAP = 200
CONFIDENCE = 0.9


@dataclass(frozen=True)
class AnnotatorReport:
    name: str
    progress: Progress
    gold_judged: int
    gold_agreement: float  # nan before the first gold judgment
    agreement_with_others: float  # nan with one annotator
    tournament: Tournament


@dataclass(frozen=True)
class CampaignReport:
    name: str
    item_paths: list[str]  # in the tournaments' item order
    annotators: list[AnnotatorReport]


def _gold_agreement(session: Session, annotator_id: int) -> tuple[int, float]:
    rows = session.execute(
        select(Pair.left_id, Pair.right_id, GoldPair.winner_id, Judgment.choice)
        .join(GoldPair, GoldPair.id == Pair.gold_pair_id).join(Judgment, Judgment.pair_id == Pair.id)
        .where(Pair.annotator_id == annotator_id, Judgment.choice != "skip")).all()
    scores = [0.5 if choice == "tie" else float((left if choice == "left" else right) == winner)
              for left, right, winner, choice in rows]
    return len(scores), (sum(scores) / len(scores) if scores else math.nan)


def campaign_reports(session: Session, name: str | None = None) -> list[CampaignReport]:
    """Every campaign's report (or NAME's only; an unknown NAME raises)."""
    query = select(Campaign).order_by(Campaign.id)
    if name is not None:
        query = query.where(Campaign.name == name)
    campaigns = list(session.scalars(query))
    if name is not None and not campaigns:
        known = ", ".join(session.scalars(select(Campaign.name).order_by(Campaign.id))) or "none"
        raise AnnotateError(f"no campaign named {name!r} in this database (campaigns: {known})")
    reports = []
    for campaign in campaigns:
        item_paths = list(session.scalars(select(Image.path).where(Image.campaign_id == campaign.id,
                                                                   Image.in_tournament).order_by(Image.id)))
        annotators = list(session.scalars(select(Annotator).where(Annotator.campaign_id == campaign.id)
                                          .order_by(Annotator.id)))
        tournaments = [replay_tournament(session, annotator, campaign) for annotator in annotators]
        strengths = [tournament.strengths() for tournament in tournaments]
        rows = []
        for index, (annotator, tournament) in enumerate(zip(annotators, tournaments, strict=True)):
            taus = [metrics.kendall_tau_b(strengths[index], other) for other_index, other in enumerate(strengths)
                    if other_index != index]
            gold_judged, gold_agreement = _gold_agreement(session, annotator.id)
            rows.append(AnnotatorReport(annotator.name, read_progress(session, annotator.id), gold_judged,
                                        gold_agreement,
                                        float(np.mean(taus)) if taus else math.nan, tournament))
        reports.append(CampaignReport(campaign.name, item_paths, rows))
    return reports


def _number(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def status_text(reports: list[CampaignReport]) -> str:
    if not reports:
        return "no campaigns in this database\n"
    lines = []
    for report in reports:
        lines.append(f"campaign {report.name}: {len(report.item_paths)} images")
        lines.append(f"  {'annotator':<16} {'round':>7} {'in round':>9} {'judged':>7} {'skipped':>8} "
                     f"{'gold':>11} {'vs others':>10}  state")
        for row in report.annotators:
            state = row.progress
            gold = f"{_number(row.gold_agreement)} ({row.gold_judged})"
            lines.append(f"  {row.name:<16} {state.round + 1:>3}/{state.rounds:<3} "
                         f"{state.judged_in_round:>4}/{state.pairs_in_round:<4} {state.judged_total:>7} "
                         f"{state.skipped_total:>8} {gold:>11} {_number(row.agreement_with_others):>10}  "
                         f"{'done' if state.done else 'judging'}")
    return "\n".join(lines) + "\n"


def export_tables(report: CampaignReport, exclude: set[str], num_bootstrap: int = NUM_BOOTSTRAP
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """(one row per item, one row per annotator, one row per judgment of the annotators in the aggregate: the
    pairs manifest `image_a,image_b,outcome` that a Bradley-Terry scorer trains on, plus `annotator`).
    EXCLUDE: annotators left out of the aggregated level and the judgments; NUM_BOOTSTRAP: resamples for the
    Bradley-Terry intervals."""
    unknown = exclude - {row.name for row in report.annotators}
    if unknown:
        raise AnnotateError(f"--exclude names no annotator of campaign {report.name}: {', '.join(sorted(unknown))}")
    num_items = len(report.item_paths)
    index_judgments = {}
    for row in report.annotators:
        index = {item_id: position for position, item_id in enumerate(row.tournament.item_ids)}
        index_judgments[row.name] = [(index[left], index[right], outcome)
                                     for left, right, outcome in row.tournament.judgments()]
    kept = [row.name for row in report.annotators if row.name not in exclude]
    if not kept:
        raise AnnotateError("--exclude leaves no annotator for the aggregated level")
    aggregate = ranking.aggregate_annotators(num_items, [index_judgments[name] for name in kept])
    aggregated_levels = ranking.levels_from_scores(aggregate.scores, NUM_LEVELS)
    item_rows = [{"item": path, "level": int(aggregated_levels[item]), "score": float(aggregate.scores[item])}
                 for item, path in enumerate(report.item_paths)]
    annotator_rows = []
    for row in report.annotators:
        fit = ranking.bradley_terry(num_items, index_judgments[row.name], num_bootstrap=num_bootstrap,
                                    confidence=CONFIDENCE)
        levels = ranking.levels_from_scores(fit.scores, NUM_LEVELS)
        points = {standing.item_id: standing.points for standing in row.tournament.standings()}
        for item, item_row in enumerate(item_rows):
            item_id = row.tournament.item_ids[item]
            item_row.update({f"{row.name}:points": points[item_id], f"{row.name}:bt": float(fit.scores[item]),
                             f"{row.name}:bt_low": float(fit.lower[item]),
                             f"{row.name}:bt_high": float(fit.upper[item]),
                             f"{row.name}:level": int(levels[item])})
        state = row.progress
        annotator_rows.append({
            "annotator": row.name, "in_aggregate": row.name not in exclude, "done": state.done,
            "round": state.round + 1, "rounds": state.rounds, "judged": state.judged_total,
            "skipped": state.skipped_total, "gold_judged": row.gold_judged,
            "gold_agreement": None if math.isnan(row.gold_agreement) else row.gold_agreement,
            "agreement_with_others": None if math.isnan(row.agreement_with_others) else row.agreement_with_others})
    judgment_rows = [{"image_a": report.item_paths[left], "image_b": report.item_paths[right], "outcome": outcome,
                      "annotator": name} for name in kept for left, right, outcome in index_judgments[name]]
    return item_rows, annotator_rows, judgment_rows


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_atomically(files: dict[Path, str]) -> None:
    """Writes every file to a temporary name first, then renames them all, so an error leaves no half file."""
    temporaries = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in files}
    try:
        for path, text in files.items():
            temporaries[path].write_text(text)
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


def write_export(report: CampaignReport, out: Path, exclude: set[str], num_bootstrap: int = NUM_BOOTSTRAP
                 ) -> list[Path]:
    """Writes OUT (.json: items, annotators and judgments; .csv: items, with OUT's stem + .annotators.csv and,
    once there are judgments, + .pairs.csv beside it)."""
    if out.suffix not in (".csv", ".json"):
        raise AnnotateError(f"--out {out}: the file name must end in .csv or .json")
    if not out.parent.is_dir():
        raise AnnotateError(f"--out {out}: the folder {out.parent} does not exist")
    if num_bootstrap < 1:
        raise AnnotateError(f"--bootstrap must be at least 1, got {num_bootstrap}")
    item_rows, annotator_rows, judgment_rows = export_tables(report, exclude, num_bootstrap)
    if out.suffix == ".json":
        document = {"campaign": report.name, "num_levels": NUM_LEVELS, "confidence": CONFIDENCE,
                    "num_bootstrap": num_bootstrap,
                    "items": item_rows, "annotators": annotator_rows, "judgments": judgment_rows}
        files = {out: json.dumps(document, indent=1) + "\n"}
    else:
        files = {out: _csv_text(item_rows), out.with_name(f"{out.stem}.annotators.csv"): _csv_text(annotator_rows)}
        if judgment_rows:
            files[out.with_name(f"{out.stem}.pairs.csv")] = _csv_text(judgment_rows)
    _write_atomically(files)
    return list(files)
