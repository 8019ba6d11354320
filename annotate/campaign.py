"""`create`: a campaign's images, gold pairs and annotators, each annotator's first round, and the tokens.

Everything lands in one transaction; the tokens file (mode 0600) is written next to its final name first
and renamed into place only after the commit, so a failed `create` leaves neither rows nor tokens behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from annotate import auth
from annotate.db import sessions, upgrade
from annotate.errors import AnnotateError
from annotate.images import ImageFile, find_images, read_gold_pairs
from annotate.judging import queue_round
from annotate.models import Annotator, Campaign, GoldPair, Image
from ernie_jax.aesthetics.swiss import Tournament

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
MAX_GOLD_RATE = 0.5


@dataclass(frozen=True)
class Credential:
    annotator: str
    token: str
    url: str


def parse_annotators(names: str) -> list[str]:
    annotators = [name.strip() for name in names.split(",") if name.strip()]
    if not annotators:
        raise AnnotateError("--annotators needs at least one name (a,b,c)")
    for name in annotators:
        if not _NAME.match(name):
            raise AnnotateError(f"annotator name {name!r}: use letters, digits and _ . @ - (at most 100)")
    if len(set(annotators)) != len(annotators):
        raise AnnotateError(f"--annotators lists a name twice: {names}")
    return annotators


def _add_images(session, campaign_id: int, files: list[ImageFile], in_tournament: bool) -> dict[str, Image]:
    rows = {file.path: Image(campaign_id=campaign_id, path=file.path, sha256=file.sha256,
                             media_type=file.media_type, in_tournament=in_tournament) for file in files}
    session.add_all(rows.values())
    return rows


def _write_private(path: Path, text: str) -> Path:
    """Writes TEXT to a new file beside PATH, readable only by its owner; returns the temporary path."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return temporary


def create_campaign(engine: Engine, name: str, images: str, annotators: list[str], rounds: int | None,
                    seed: int, gold_file: str | None, gold_rate: float | None, base_url: str,
                    tokens_file: Path) -> list[Credential]:
    """Creates campaign NAME (see the module docstring) and returns each annotator's token and page URL."""
    if not _NAME.match(name):
        raise AnnotateError(f"campaign name {name!r}: use letters, digits and _ . @ - (at most 100)")
    if gold_rate is None:
        gold_rate = 0.1 if gold_file else 0.0
    if not 0 <= gold_rate <= MAX_GOLD_RATE:
        raise AnnotateError(f"--gold-rate must be in [0, {MAX_GOLD_RATE}], got {gold_rate}")
    if gold_rate > 0 and not gold_file:
        raise AnnotateError("--gold-rate needs gold pairs: pass --gold FILE")
    if tokens_file.exists():
        raise AnnotateError(f"the tokens file {tokens_file} exists already; choose another with --tokens")
    if not tokens_file.parent.is_dir():
        raise AnnotateError(f"the tokens file's folder {tokens_file.parent} does not exist")
    images_root, item_files = find_images(images)
    gold_root, gold_pairs = read_gold_pairs(gold_file) if gold_file else (None, [])
    try:
        template = Tournament([file.path for file in item_files], rounds=rounds, seed=seed)
    except ValueError as error:
        raise AnnotateError(f"cannot run a tournament of {len(item_files)} images: {error}") from error
    upgrade(engine)
    session_factory = sessions(engine)
    with session_factory() as session:
        if session.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
            raise AnnotateError(f"a campaign named {name!r} exists already in this database")

    tokens = [auth.new_token() for _ in annotators]
    credentials = [Credential(annotator, token, f"{base_url.rstrip('/')}/#token={token}")
                   for annotator, token in zip(annotators, tokens, strict=True)]
    temporary = _write_private(tokens_file, "".join(f"{c.annotator}\t{c.token}\t{c.url}\n" for c in credentials))
    try:
        with session_factory() as session, session.begin():
            campaign = Campaign(name=name, images_root=str(images_root),
                                gold_root=str(gold_root) if gold_root else None,
                                rounds=template.rounds, gold_rate=gold_rate, signing_key=auth.new_signing_key(),
                                created_at=datetime.now(timezone.utc))
            session.add(campaign)
            session.flush()
            items = _add_images(session, campaign.id, item_files, in_tournament=True)
            gold_images = _add_images(session, campaign.id, list({file.path: file for pair in gold_pairs
                                                                  for file in pair}.values()), in_tournament=False)
            session.flush()
            session.add_all(GoldPair(campaign_id=campaign.id, winner_id=gold_images[winner.path].id,
                                     loser_id=gold_images[loser.path].id) for winner, loser in gold_pairs)
            item_ids = sorted(image.id for image in items.values())
            for index, credential in enumerate(credentials):
                annotator = Annotator(campaign_id=campaign.id, name=credential.annotator, seed=seed + index,
                                      token_sha256=auth.token_digest(credential.token), version=0)
                session.add(annotator)
                session.flush()
                queue_round(session, annotator, campaign,
                            Tournament(item_ids, rounds=campaign.rounds, seed=annotator.seed))
        os.replace(temporary, tokens_file)
    except IntegrityError as error:
        raise AnnotateError(f"could not create campaign {name!r}: {error.orig}") from error
    finally:
        temporary.unlink(missing_ok=True)
    return credentials
