"""The annotation service's database: migrations give the models' schema, 8 annotators judging at once lose and
double nothing (SQLite and a real PostgreSQL server), and a server killed with SIGKILL loses no committed
judgment and resumes each round where it stopped."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from annotate.db import _alembic_config, make_engine, sessions, upgrade
from annotate.models import Base, Judgment, Pair
from tests.annotate_servers import (Service, create_campaign, judge_tournament, make_images, new_database,
                                    postgres_server, replay_logs)

ANNOTATORS = [f"annotator{index}" for index in range(8)]


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A fresh, empty database of each kind (a SQLite path or a PostgreSQL URL)."""
    if request.param == "sqlite":
        return str(tmp_path / "annotations.db")
    return new_database(request.getfixturevalue("postgres"), f"test_{request.node.name.split('[')[0][-50:]}")


def _schema(engine) -> dict:
    """Everything the inspector reports about the tables, in a comparable form."""
    inspector = inspect(engine)
    tables = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        tables[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "primary": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                               f["name"]) for f in inspector.get_foreign_keys(table)),
            "unique": sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
            "checks": sorted((c["name"], " ".join(c["sqltext"].split()))
                             for c in inspector.get_check_constraints(table)),
        }
    return tables


def test_migrations_create_the_models_schema(database, tmp_path):
    """`alembic upgrade head` on an empty database: alembic's autogenerate finds nothing to change against the
    models, and the inspected schema equals that of the models' own create_all on a second empty database;
    downgrading to base removes every table."""
    migrated = make_engine(database, must_exist=False)
    upgrade(migrated)
    with migrated.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    reference_db = str(tmp_path / "reference.db") if database.endswith(".db") else new_database(
        database.rsplit("/", 1)[0] + "/postgres", "reference_schema")
    reference = make_engine(reference_db, must_exist=False)
    Base.metadata.create_all(reference)
    assert _schema(migrated) == _schema(reference)
    assert len(_schema(migrated)) == 6
    command.downgrade(_alembic_config(migrated), "base")
    assert _schema(migrated) == {}


def test_eight_annotators_at_once_lose_and_double_nothing(database, tmp_path):
    """8 annotators judge their whole tournaments (8 images, 3 rounds: 12 games each) at the same time against
    a running server, each judgment posted twice at once: every annotator finishes, the database holds exactly
    one judgment per game, and every annotator's log replays pairing for pairing through a Tournament."""
    make_images(tmp_path / "images", 8)
    tokens = create_campaign(database, tmp_path / "images", "study", ANNOTATORS, 3, tmp_path)
    service = Service(database, tmp_path / "serve.log").start()
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(len(ANNOTATORS)) as pool:
            logs = dict(zip(ANNOTATORS, pool.map(lambda name: judge_tournament(service.url, tokens[name]), ANNOTATORS),
                            strict=True))
        elapsed = time.perf_counter() - started
    finally:
        service.stop()
    games = sum(len(log) for log in logs.values())
    print(f"{database.split(':')[0]}: {games} judgments (each posted twice) in {elapsed:.2f} s")
    assert all(len(log) == 12 for log in logs.values())
    with sessions(make_engine(database))() as session:
        assert session.scalar(select(func.count(Judgment.id))) == games
        assert session.scalar(select(func.count(Pair.id))) == games
    replay_logs(database, logs)


def test_a_killed_server_loses_no_judgment_and_resumes(database, tmp_path):
    """4 annotators judge while the server is killed with SIGKILL (twice, at about 10 and 25 confirmed
    judgments) and restarted; their clients repeat what got no answer. Every judgment the server confirmed is in
    the database, nothing is recorded twice, and the logs replay through Tournaments: each round went on where
    it stopped."""
    db = database
    make_images(tmp_path / "images", 8)
    names = ANNOTATORS[:4]
    tokens = create_campaign(db, tmp_path / "images", "study", names, 3, tmp_path)
    service = Service(db, tmp_path / "serve.log").start()
    acknowledged: list[tuple[int, str]] = []
    killed_at: list[int] = []
    finished = threading.Event()

    def kill_and_restart():
        for threshold in (10, 25):
            while len(acknowledged) < threshold and not finished.is_set():
                time.sleep(0.005)
            service.kill()
            killed_at.append(len(acknowledged))
            service.start()

    try:
        with ThreadPoolExecutor(len(names) + 1) as pool:
            killer = pool.submit(kill_and_restart)
            logs = dict(zip(names, pool.map(lambda name: judge_tournament(service.url, tokens[name], acknowledged),
                                            names), strict=True))
            finished.set()
            killer.result()
    finally:
        service.stop()
    assert len(killed_at) == 2 and killed_at[-1] < 4 * 12, killed_at  # both kills fell while judging went on
    assert len(acknowledged) == 4 * 12
    with sessions(make_engine(db))() as session:
        stored = set(session.execute(select(Judgment.pair_id, Judgment.choice)).all())
    assert set(acknowledged) == stored and len(stored) == len(acknowledged)
    replay_logs(db, logs)
