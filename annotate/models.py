"""The database schema (SQLAlchemy 2 declarative models); migrations/ creates and upgrades it.

A campaign is one set of images that every one of its annotators ranks in a tournament of their own. The
pairs table is the annotation queue: a round's pairs are written when the round starts, in the order they
are shown, with gold (calibration) pairs mixed in; a judgment fills one pair. The tournament state itself is
never stored: it is rebuilt by replaying the judgments (see judging.py), so the rows below are the record.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (Boolean, CheckConstraint, DateTime, Float, ForeignKey, Integer, MetaData, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

CHOICES = ("left", "right", "tie", "skip")


class Base(DeclarativeBase):
    # Named constraints, so that a later migration can alter them by name on every backend.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    images_root: Mapped[str] = mapped_column(Text)
    gold_root: Mapped[str | None] = mapped_column(Text)
    rounds: Mapped[int] = mapped_column(Integer)
    gold_rate: Mapped[float] = mapped_column(Float)
    # HMAC key of the image URLs handed to this campaign's annotators.
    signing_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Image(Base):
    """An image file: a tournament item, or (in_tournament false) an image shown only in gold pairs."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("campaign_id", "path", "in_tournament"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the campaign's images_root (gold_root if not an item)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(40))
    in_tournament: Mapped[bool] = mapped_column(Boolean)


class GoldPair(Base):
    __tablename__ = "gold_pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    winner_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    loser_id: Mapped[int] = mapped_column(ForeignKey("images.id"))


class Annotator(Base):
    __tablename__ = "annotators"
    __table_args__ = (UniqueConstraint("campaign_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # the token itself is never stored
    seed: Mapped[int] = mapped_column(Integer)
    # Bumped by every write: the first statement of a write takes this row's lock, and the in-memory
    # tournament cache is valid for one version.
    version: Mapped[int] = mapped_column(Integer, default=0)


class Pair(Base):
    __tablename__ = "pairs"
    __table_args__ = (UniqueConstraint("annotator_id", "round", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)  # 0-based, as Tournament.round
    position: Mapped[int] = mapped_column(Integer)  # order within the round; skipped pairs come back last
    left_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    right_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    gold_pair_id: Mapped[int | None] = mapped_column(ForeignKey("gold_pairs.id"))  # None: a tournament game
    requeued_from_id: Mapped[int | None] = mapped_column(ForeignKey("pairs.id"))  # the skipped pair it repeats


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (CheckConstraint("choice IN ('left', 'right', 'tie', 'skip')", name="choice"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), unique=True)
    choice: Mapped[str] = mapped_column(String(5))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
