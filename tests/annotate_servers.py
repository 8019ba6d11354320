"""Helpers for the annotation service's tests: tiny images, campaigns, a running `serve`, a PostgreSQL server.

Nothing here is skipped when a system program is missing: CI installs Debian's chromium and postgresql
(.ci/run), so a missing one fails the test with the command that installs it.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import httpx
import pytest
from PIL import Image

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
        Image.new("RGB", (size, size), (index * 37 % 256, index * 91 % 256, 128)).save(folder / name)
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
        port = free_port()
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
