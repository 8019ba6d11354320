"""The annotation queue: the pair an annotator judges next, and what a judgment or an undo changes.

A tournament's state is not stored: `Tournament(item_ids, rounds, seed)` plus its recorded games determine
it, so `replay_tournament` rebuilds it from the judgments, round by round, in the order they were given. A
round's pairs are written to the pairs table when the round starts (in the order pairings() lists them, gold
pairs mixed in), and the annotator judges them in that order; "skip" puts the pair at the end of the round
again. When the last pair of a round is judged, the next round is paired in the same transaction, so the queue
is always complete and a restarted server resumes exactly where the database says.

Every write first locks its annotator's row (SELECT ... FOR UPDATE on PostgreSQL; SQLite serialises all
writes), so one annotator's writes run one at a time, and bumps the row's `version` if it changes anything.
The version tags the process-local cache of replayed tournaments, valid only while nobody else has written.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from annotate.db import sessions
from annotate.errors import AnnotateError
from annotate.models import Annotator, Campaign, GoldPair, Image, Judgment, Pair
from ernie_jax.aesthetics.swiss import Tournament


class NotFound(AnnotateError):
    status_code = 404


class Forbidden(AnnotateError):
    status_code = 403


class Conflict(AnnotateError):
    status_code = 409


def tournament_items(session: Session, campaign_id: int) -> list[int]:
    """The image ids a campaign's tournaments rank, in the order Tournament receives them."""
    return list(session.scalars(select(Image.id).where(Image.campaign_id == campaign_id, Image.in_tournament)
                                .order_by(Image.id)))


def tournament_games(session: Session, annotator_id: int) -> list[tuple[int, int, int, str]]:
    """(round, left image id, right image id, outcome) of every judged tournament game, in the order given."""
    rows = session.execute(
        select(Pair.round, Pair.left_id, Pair.right_id, Judgment.choice).join(Judgment, Judgment.pair_id == Pair.id)
        .where(Pair.annotator_id == annotator_id, Pair.gold_pair_id.is_(None), Judgment.choice != "skip")
        .order_by(Pair.round, Judgment.id))
    return [tuple(row) for row in rows]


def replay_tournament(session: Session, annotator: Annotator, campaign: Campaign) -> Tournament:
    tournament = Tournament(tournament_items(session, campaign.id), rounds=campaign.rounds, seed=annotator.seed)
    for round_index, left, right, outcome in tournament_games(session, annotator.id):
        if tournament.round != round_index:
            raise AnnotateError(f"annotator {annotator.name}: a game stored in round {round_index + 1} replays in "
                                f"round {tournament.round + 1}; the pairing engine no longer reproduces this database")
        try:
            tournament.record(left, right, outcome)
        except (ValueError, KeyError) as error:
            raise AnnotateError(f"annotator {annotator.name}: the stored game {left} vs {right} in round "
                                f"{round_index + 1} does not replay ({error})") from error
    return tournament


def gold_count(games: int, gold_rate: float) -> int:
    """Gold pairs to mix into a round of `games` tournament games so that `gold_rate` of the round is gold."""
    return math.floor(games * gold_rate / (1.0 - gold_rate) + 0.5)


def queue_round(session: Session, annotator: Annotator, campaign: Campaign, tournament: Tournament) -> None:
    """Writes the pairs of the tournament's current round: its games in the order pairings() lists them (a
    seeded random order), gold pairs at random places, each shown winner-left or winner-right at random."""
    round_index = tournament.round
    rng = random.Random(f"{annotator.seed}:{round_index}")
    games, _bye = tournament.pairings()
    entries: list[tuple[int, int, int | None]] = [(left, right, None) for left, right in games]
    gold_pairs = list(session.scalars(select(GoldPair).where(GoldPair.campaign_id == campaign.id)
                                      .order_by(GoldPair.id)))
    if gold_pairs and campaign.gold_rate > 0:
        random.Random(annotator.seed).shuffle(gold_pairs)  # each annotator meets the gold pairs in its own order
        count = gold_count(len(games), campaign.gold_rate)
        for offset in range(count):
            gold = gold_pairs[(round_index * count + offset) % len(gold_pairs)]
            sides = (gold.winner_id, gold.loser_id) if rng.random() < 0.5 else (gold.loser_id, gold.winner_id)
            entries.insert(rng.randrange(len(entries) + 1), (*sides, gold.id))
    session.add_all(Pair(annotator_id=annotator.id, round=round_index, position=position, left_id=left,
                         right_id=right, gold_pair_id=gold_id)
                    for position, (left, right, gold_id) in enumerate(entries))


def open_pairs(session: Session, annotator_id: int, limit: int) -> list[Pair]:
    """The annotator's unjudged pairs in the order they are to be judged."""
    return list(session.scalars(
        select(Pair).outerjoin(Judgment, Judgment.pair_id == Pair.id)
        .where(Pair.annotator_id == annotator_id, Judgment.id.is_(None))
        .order_by(Pair.round, Pair.position).limit(limit)))


def image_file(image: Image, campaign: Campaign, images_root: Path | None) -> Path:
    """Where an image lives: IMAGES_ROOT (or the folder recorded at create) for items, the gold file's folder
    for gold-only images."""
    if image.in_tournament:
        return (images_root or Path(campaign.images_root)) / image.path
    return Path(campaign.gold_root) / image.path


@dataclass(frozen=True)
class Who:
    """An authenticated annotator."""

    annotator_id: int
    name: str
    campaign_id: int
    campaign_name: str
    signing_key: str


@dataclass(frozen=True)
class Progress:
    round: int  # 0-based; the last round once the tournament is done
    rounds: int
    done: bool
    judged_in_round: int
    pairs_in_round: int  # the round's pairs, gold included, a skipped pair counted once
    judged_total: int
    skipped_total: int


def read_progress(session: Session, annotator_id: int) -> Progress:
    campaign = session.scalar(select(Campaign).join(Annotator, Annotator.campaign_id == Campaign.id)
                              .where(Annotator.id == annotator_id))
    current = open_pairs(session, annotator_id, 1)
    round_index = current[0].round if current else session.scalar(
        select(func.max(Pair.round)).where(Pair.annotator_id == annotator_id))
    counts = dict(session.execute(
        select(Judgment.choice, func.count()).join(Pair, Pair.id == Judgment.pair_id)
        .where(Pair.annotator_id == annotator_id).group_by(Judgment.choice)).all())
    in_round = dict(session.execute(  # choice -> count, None for the open pairs
        select(Judgment.choice, func.count()).select_from(Pair).outerjoin(Judgment, Judgment.pair_id == Pair.id)
        .where(Pair.annotator_id == annotator_id, Pair.round == round_index).group_by(Judgment.choice)).all())
    in_round.pop("skip", None)  # a skipped pair is in the round again, as its requeued copy
    return Progress(round=round_index, rounds=campaign.rounds, done=not current,
                    judged_in_round=sum(in_round.values()) - in_round.get(None, 0),
                    pairs_in_round=sum(in_round.values()),
                    judged_total=sum(counts.values()) - counts.get("skip", 0),
                    skipped_total=counts.get("skip", 0))


class Judging:
    """The queue operations on one database, with a cache of replayed tournaments (thread-safe)."""

    def __init__(self, engine: Engine):
        self.read_sessions = sessions(engine, read_only=True)
        self.write_sessions = sessions(engine)
        self._cache: dict[int, tuple[int, Tournament]] = {}
        self._cache_lock = threading.Lock()

    def who(self, token_sha256: str) -> Who | None:
        with self.read_sessions() as session:
            row = session.execute(
                select(Annotator.id, Annotator.name, Campaign.id, Campaign.name, Campaign.signing_key)
                .join(Campaign, Campaign.id == Annotator.campaign_id)
                .where(Annotator.token_sha256 == token_sha256)).first()
        return Who(*row) if row else None

    def next_pairs(self, annotator_id: int, count: int = 2) -> tuple[list[tuple[Pair, Image, Image]], Progress]:
        """The next `count` pairs to judge (with their images) and the annotator's progress."""
        with self.read_sessions() as session, session.begin():
            pairs = open_pairs(session, annotator_id, count)
            image_ids = {pair.left_id for pair in pairs} | {pair.right_id for pair in pairs}
            images = {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(image_ids)))}
            return ([(pair, images[pair.left_id], images[pair.right_id]) for pair in pairs],
                    read_progress(session, annotator_id))

    def progress(self, annotator_id: int) -> Progress:
        with self.read_sessions() as session, session.begin():
            return read_progress(session, annotator_id)

    def missing_files(self, images_root: Path | None) -> list[Path]:
        """The image files of every campaign that are not on disk."""
        with self.read_sessions() as session:
            rows = session.execute(select(Image, Campaign).join(Campaign, Campaign.id == Image.campaign_id)).all()
        return [file for file in (image_file(image, campaign, images_root) for image, campaign in rows)
                if not file.is_file()]

    def signing_key(self, annotator_id: int) -> str | None:
        """The signing key of the annotator's campaign (None for an unknown annotator)."""
        with self.read_sessions() as session:
            return session.scalar(select(Campaign.signing_key).join(Annotator, Annotator.campaign_id == Campaign.id)
                                  .where(Annotator.id == annotator_id))

    def image(self, annotator_id: int, image_id: int) -> tuple[Image, Campaign]:
        """The image if it belongs to the annotator's campaign (its items and gold images), else NotFound."""
        with self.read_sessions() as session:
            row = session.execute(
                select(Image, Campaign).join(Campaign, Campaign.id == Image.campaign_id)
                .join(Annotator, Annotator.campaign_id == Campaign.id)
                .where(Image.id == image_id, Annotator.id == annotator_id)).first()
        if row is None:
            raise NotFound(f"no image {image_id} in this annotator's campaign")
        return tuple(row)

    def judge(self, annotator_id: int, pair_id: int, choice: str) -> bool:
        """Records CHOICE for the pair; returns False when the same judgment was already recorded (nothing
        changes). Raises NotFound, Forbidden (another annotator's pair) or Conflict (a different judgment
        already stands, or the pair is not the one to judge now)."""
        # Replaying can take seconds for a large tournament, so it happens before the lock (see _take_tournament).
        prepared_version, tournament = self._take_tournament(annotator_id)
        with self.write_sessions() as session:
            with session.begin():
                version = self._lock(session, annotator_id)
                pair = session.get(Pair, pair_id)
                if pair is None:
                    raise NotFound(f"no pair {pair_id}")
                if pair.annotator_id != annotator_id:
                    raise Forbidden(f"pair {pair_id} belongs to another annotator's tournament")
                earlier = session.scalar(select(Judgment.choice).where(Judgment.pair_id == pair_id))
                current = open_pairs(session, annotator_id, 1)
                if earlier == choice:
                    self._put_back(annotator_id, prepared_version, tournament)
                    return False
                if earlier is not None:
                    now = f"round {current[0].round + 1}" if current else "the tournament is finished"
                    raise Conflict(f"pair {pair_id} (round {pair.round + 1}) was already judged {earlier!r}; "
                                   f"{now}; undo it first if it is the last judgment of the current round")
                if current[0].id != pair_id:
                    raise Conflict(f"pair {pair_id} is not the pair to judge now (pair {current[0].id}, round "
                                   f"{current[0].round + 1}); GET /api/next")
                if version != prepared_version:  # a write came in between: replay again, under the lock
                    tournament = replay_tournament(session, *self._annotator(session, annotator_id))
                self._bump(session, annotator_id, version)
                session.add(Judgment(pair_id=pair_id, choice=choice, created_at=datetime.now(timezone.utc)))
                if choice == "skip":
                    last_position = session.scalar(select(func.max(Pair.position)).where(
                        Pair.annotator_id == annotator_id, Pair.round == pair.round))
                    session.add(Pair(annotator_id=annotator_id, round=pair.round, position=last_position + 1,
                                     left_id=pair.left_id, right_id=pair.right_id, gold_pair_id=pair.gold_pair_id,
                                     requeued_from_id=pair.id))
                elif pair.gold_pair_id is None:
                    tournament.record(pair.left_id, pair.right_id, choice)
                session.flush()
                if not open_pairs(session, annotator_id, 1) and not tournament.done:
                    queue_round(session, *self._annotator(session, annotator_id), tournament)
            self._put_back(annotator_id, version + 1, tournament)
        return True

    def undo_last(self, annotator_id: int) -> tuple[int, str]:
        """Removes the annotator's last judgment if it lies in the current round; returns (pair id, choice)."""
        with self.write_sessions() as session, session.begin():
            version = self._lock(session, annotator_id)
            last = session.execute(
                select(Judgment, Pair).join(Pair, Pair.id == Judgment.pair_id)
                .where(Pair.annotator_id == annotator_id).order_by(Judgment.id.desc()).limit(1)).first()
            if last is None:
                raise Conflict("there is no judgment to undo")
            judgment, pair = last
            current = open_pairs(session, annotator_id, 1)
            if current and current[0].round != pair.round:
                raise Conflict(f"the last judgment closed round {pair.round + 1}, and round {current[0].round + 1} "
                               "is paired on its results; undo works within the current round only")
            self._bump(session, annotator_id, version)
            if judgment.choice == "skip":
                session.execute(delete(Pair).where(Pair.requeued_from_id == pair.id))
            session.delete(judgment)
        return pair.id, judgment.choice

    def _lock(self, session: Session, annotator_id: int) -> int:
        """Locks the annotator's row for this transaction (SQLite: the whole database, since the transaction
        began IMMEDIATE); returns its version."""
        return session.scalar(select(Annotator.version).where(Annotator.id == annotator_id).with_for_update())

    def _bump(self, session: Session, annotator_id: int, version: int) -> None:
        session.execute(update(Annotator).where(Annotator.id == annotator_id).values(version=version + 1))

    def _annotator(self, session: Session, annotator_id: int) -> tuple[Annotator, Campaign]:
        annotator = session.get(Annotator, annotator_id)
        return annotator, session.get(Campaign, annotator.campaign_id)

    def _take_tournament(self, annotator_id: int) -> tuple[int, Tournament]:
        """(version, the annotator's tournament at that version): from the cache if nobody wrote since, else
        replayed in a read-only transaction. It leaves the cache, since the caller changes it."""
        with self._cache_lock:
            cached = self._cache.pop(annotator_id, None)
        with self.read_sessions() as session, session.begin():
            # Read before the games: should a write land in between, the tag is older than the state, and the
            # writer's version check replays again.
            version = session.scalar(select(Annotator.version).where(Annotator.id == annotator_id))
            if cached is not None and cached[0] == version:
                return cached
            return version, replay_tournament(session, *self._annotator(session, annotator_id))

    def _put_back(self, annotator_id: int, version: int, tournament: Tournament) -> None:
        with self._cache_lock:
            self._cache[annotator_id] = (version, tournament)
