"""Engines, sessions and schema migrations.

`--db` takes a SQLite file path or any SQLAlchemy URL (`postgresql+psycopg://user@host/db`). SQLite runs in
WAL mode with full fsync at commit, and every transaction begins IMMEDIATE: writers queue on the database
lock (up to the busy timeout) instead of failing when a read snapshot goes stale. PostgreSQL needs nothing
special: writes lock their annotator's row (judging.py). Sessions that only read begin DEFERRED, so that on
SQLite a long read (replaying a tournament, an export) does not hold up the writers.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from annotate.errors import AnnotateError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_READ_ONLY = "annotate_read_only"  # an execution option of the read-only sessions


def database_url(db: str) -> str:
    """A SQLAlchemy URL from `--db`: a URL as given, anything else a SQLite file path."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def make_engine(db: str, must_exist: bool = True) -> Engine:
    """An engine on DB; a SQLite file that does not exist is an error unless MUST_EXIST is False (`create`)."""
    url = database_url(db)
    if url.startswith("sqlite:///") and must_exist and not Path(url.removeprefix("sqlite:///")).is_file():
        raise AnnotateError(f"no database file {url.removeprefix('sqlite:///')}; `python -m annotate create` makes one")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN would be DEFERRED; see "begin" below
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON",
                       f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def sessions(engine: Engine, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on ENGINE. READ_ONLY ones (that must not write) begin DEFERRED on SQLite: in WAL mode they read
    a snapshot without waiting for, or blocking, the writers."""
    return sessionmaker(engine.execution_options(**{_READ_ONLY: read_only}), expire_on_commit=False)


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> None:
    """Brings the schema to the newest migration (creates it in an empty database)."""
    command.upgrade(_alembic_config(engine), "head")


def check_current(engine: Engine) -> None:
    """Raises unless the database holds the newest schema, naming the command that upgrades it."""
    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        raise AnnotateError(f"{engine.url.render_as_string()} holds no annotation database; "
                            "make one with `python -m annotate create`")
    if current != head:
        raise AnnotateError(f"the database schema is at revision {current}, this code needs {head}: back it up, "
                            "then run `python -m annotate upgrade --db DB`")
