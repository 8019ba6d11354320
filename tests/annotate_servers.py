"""Helpers for the annotation service's tests: tiny images, campaigns, a running `serve`, a PostgreSQL server.

Nothing here is skipped when a system program is missing: CI installs Debian's chromium and postgresql
(.ci/run), so a missing one fails the test with the command that installs it.
"""

from __future__ import annotations

import contextlib
import functools
import csv
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from ernie_jax.aesthetics.swiss import Tournament

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_images(folder: Path, count: int, size: int = 8) -> list[str]:
    """COUNT solid-colour PNGs named img00.png... in FOLDER; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img{index:02d}.png"
        PILImage.new("RGB", (size, size), (index * 37 % 256, index * 91 % 256, 128)).save(folder / name)
        names.append(name)
    return names


def create_campaign(db: str, images: Path, name: str, annotators: list[str], rounds: int, workdir: Path,
                    extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Runs `create` in this process; returns annotator -> token (read from the tokens file)."""
    from annotate.__main__ import main

    tokens_file = workdir / f"{name}.tokens.tsv"
    code = main(["create", "--db", db, "--images", str(images), "--name", name, "--annotators", ",".join(annotators),
                 "--rounds", str(rounds), "--tokens", str(tokens_file), *extra])
    assert code == 0
    with tokens_file.open() as handle:
        return {row[0]: row[1] for row in csv.reader(handle, delimiter="\t")}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m annotate ARGS` in a fresh process (its exit code and output, as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "annotate", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


class Service:
    """`python -m annotate serve` in a subprocess on a free port; `kill()` sends SIGKILL."""

    def __init__(self, db: str, log: Path):
        self.db, self.log = db, log
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Service:
        """Starts the server (on the port of the previous start, if any) and waits until it answers."""
        port = int(self.url.rsplit(":", 1)[1]) if self.url else free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "annotate", "serve", "--db", self.db, "--port", str(port),
                 "--log-level", "warning"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=str(REPO)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self.log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"serve did not answer within 60 s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def choose(shown: dict) -> str:
    """A test annotator's choice, a function of the image ids: the lower id wins, some ties."""
    left, right = shown["left"]["id"], shown["right"]["id"]
    if (left + right) % 5 == 0:
        return "tie"
    return "left" if left < right else "right"


def _until_answered(request, deadline_s: float = 60.0) -> httpx.Response:
    """Repeats REQUEST while the server is unreachable (killed, restarting); returns its first answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return request()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def judge_tournament(url: str, token: str, acknowledged: list | None = None) -> list[tuple[int, int, int, str]]:
    """Judges an annotator's whole tournament through the API, each judgment posted by two threads at once
    (exactly one must record it, the other see a duplicate). A request that finds the server gone is repeated
    until it answers. Returns the games as (0-based round, left id, right id, choice); ACKNOWLEDGED gets
    (pair id, choice) of every judgment the server confirmed."""
    log = []
    with client(url, token) as http, ThreadPoolExecutor(2) as pool:
        shown = _until_answered(lambda: http.get("/api/next")).json()
        while not shown["done"]:
            body = {"pair_id": shown["pair_id"], "choice": choose(shown)}
            post = functools.partial(http.post, "/api/judgments", json=body)
            responses = list(pool.map(_until_answered, [post, post]))
            assert [response.status_code for response in responses] == [200, 200], [r.text for r in responses]
            duplicates = sorted(response.json()["duplicate"] for response in responses)
            # [False, True], or [True, True] when the server died after committing and before answering
            assert duplicates[1], duplicates
            log.append((shown["round"] - 1, shown["left"]["id"], shown["right"]["id"], body["choice"]))
            if acknowledged is not None:
                acknowledged.append((body["pair_id"], body["choice"]))
            shown = responses[0].json()["next"]
    return log


def replay_logs(db: str, logs: dict[str, list]) -> dict[str, Tournament]:
    """Each annotator's log through a Tournament seeded as `create` seeds it (annotator k: seed k), checking that
    every game was a pairing of its round and that the tournament finished; returns the tournaments."""
    from annotate.db import make_engine, sessions
    from annotate.models import Campaign, Image

    with sessions(make_engine(db))() as session:
        item_ids = sorted(session.scalars(select(Image.id).where(Image.in_tournament)))
        rounds = session.scalar(select(Campaign.rounds))
    tournaments = {}
    for seed, (name, log) in enumerate(logs.items()):
        tournament = Tournament(item_ids, rounds=rounds, seed=seed)
        for round_index, left, right, choice in log:
            assert tournament.round == round_index and (left, right) in tournament.pending(), (name, left, right)
            tournament.record(left, right, choice)
        assert tournament.done, name
        tournaments[name] = tournament
    return tournaments


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb")]
    if not found:
        pytest.fail("PostgreSQL's server binaries (initdb, pg_ctl) are missing: as root, "
                    "`apt-get install -y --no-install-recommends postgresql` (.ci/run does)")
    return Path(found[-1]).parent


@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL server on a free localhost port; yields its SQLAlchemy URL.

    initdb refuses to run as root, so as root the server runs as the `postgres` user that Debian's package
    creates (runuser), in a temporary folder it owns."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="annotate-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, the PostgreSQL test needs the `postgres` user of Debian's postgresql package")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    try:
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "annotate", "-A", "trust",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql+psycopg://annotate@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server_url: str, name: str) -> str:
    """Creates database NAME on the server; returns its URL."""
    import psycopg

    with psycopg.connect(server_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"
