"""Judgments per second of the annotation service with 8 annotators judging at once, on SQLite and PostgreSQL.

Each annotator is one client thread that loops GET /api/next -> POST /api/judgments (no thinking time) over
its own tournament, against `python -m annotate serve` in its own process; the PostgreSQL server is started
from Debian's binaries as in the tests (fsync on). Not a test: nothing here asserts a speed.

    python benchmarks/annotate_throughput.py [--items 32] [--rounds 5] [--annotators 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.annotate_servers import (Service, choose, client, create_campaign, make_images,  # noqa: E402
                                    new_database, postgres_server)


def judge(url: str, token: str) -> int:
    judged = 0
    with client(url, token) as http:
        shown = http.get("/api/next").json()
        while not shown["done"]:
            response = http.post("/api/judgments", json={"pair_id": shown["pair_id"], "choice": choose(shown)})
            response.raise_for_status()
            shown = response.json()["next"]
            judged += 1
    return judged


def measure(db: str, images: Path, workdir: Path, rounds: int, annotators: int) -> tuple[int, float]:
    names = [f"annotator{index}" for index in range(annotators)]
    tokens = create_campaign(db, images, "bench", names, rounds, workdir)
    service = Service(db, workdir / "serve.log").start()
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(annotators) as pool:
            judged = sum(pool.map(lambda name: judge(service.url, tokens[name]), names))
        return judged, time.perf_counter() - started
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--annotators", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        make_images(workdir / "images", args.items)
        with postgres_server() as server:
            for label, db in (("sqlite", str(workdir / "bench.db")), ("postgresql", new_database(server, "bench"))):
                (workdir / label).mkdir()
                judged, seconds = measure(db, workdir / "images", workdir / label, args.rounds,
                                          args.annotators)
                print(f"{label:<11} {args.annotators} annotators, {judged} judgments in {seconds:.2f} s: "
                      f"{judged / seconds:.1f} judgments/s")


if __name__ == "__main__":
    main()
