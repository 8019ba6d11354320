"""The annotation service's HTTP API, in process (FastAPI's TestClient) on a SQLite file.

A campaign of 6 images, 3 rounds, 2 annotators and one gold pair at a gold rate of 1/4 (one gold pair in each
round of 3 games). The expected values come from the annotators' own logs of what they were shown and chose,
replayed through ernie_jax.aesthetics (Tournament, ranking), never from the service's database.
"""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from annotate import auth
from annotate.__main__ import main
from annotate.app import create_app
from annotate.db import make_engine, sessions
from annotate.models import Image, Judgment
from ernie_jax.aesthetics import metrics, ranking
from ernie_jax.aesthetics.swiss import Tournament
from tests.annotate_servers import create_campaign, make_images

ROUNDS = 3
NUM_ITEMS = 6


@pytest.fixture
def campaign(tmp_path):
    names = make_images(tmp_path / "images", NUM_ITEMS)
    gold = tmp_path / "gold"
    make_images(gold, 2)
    (gold / "pairs.csv").write_text("winner,loser\nimg00.png,img01.png\n")
    db = str(tmp_path / "annotations.db")
    tokens = create_campaign(db, tmp_path / "images", "study", ["alice", "bob"], ROUNDS, tmp_path,
                             ("--gold", str(gold / "pairs.csv"), "--gold-rate", "0.25"))
    with sessions(make_engine(db))() as session:
        images = {image.id: image for image in session.scalars(select(Image))}
    return {"db": db, "tokens": tokens, "client": TestClient(create_app(db)), "images": images, "names": names,
            "tmp": tmp_path}


def headers(campaign, annotator):
    return {"Authorization": f"Bearer {campaign['tokens'][annotator]}"}


def judgment_count(campaign) -> int:
    with sessions(make_engine(campaign["db"]))() as session:
        return session.scalar(select(func.count(Judgment.id)))


def item_rank(campaign, image_id) -> int:
    """The image's index in the folder (img03.png -> 3): the hidden "quality" the test annotators judge by."""
    return int(campaign["images"][image_id].path[3:5])


def judge_everything(campaign, annotator, prefer_low: bool, gold_right: bool) -> list[tuple[int, int, int, str]]:
    """Judges the whole tournament through the API: the lower (or higher) folder index wins, indices three apart
    tie, the first pair of each round is skipped once, every judgment is posted twice. Returns the log of
    tournament games as (round, left id, right id, choice), 0-based rounds."""
    client, log, skipped_rounds = campaign["client"], [], set()
    shown = client.get("/api/next", headers=headers(campaign, annotator)).json()
    while not shown["done"]:
        left, right = shown["left"]["id"], shown["right"]["id"]
        gold = not campaign["images"][left].in_tournament
        if gold:
            winner_left = campaign["images"][left].path == "img00.png"
            choice = "left" if winner_left == gold_right else "right"
        elif shown["round"] not in skipped_rounds:
            choice = "skip"
            skipped_rounds.add(shown["round"])
        elif abs(item_rank(campaign, left) - item_rank(campaign, right)) == 3:
            choice = "tie"
        else:
            choice = "left" if (item_rank(campaign, left) < item_rank(campaign, right)) == prefer_low else "right"
        body = {"pair_id": shown["pair_id"], "choice": choice}
        first = client.post("/api/judgments", headers=headers(campaign, annotator), json=body)
        again = client.post("/api/judgments", headers=headers(campaign, annotator), json=body)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
        assert again.json()["next"] == first.json()["next"] | {"left": again.json()["next"]["left"],
                                                                "right": again.json()["next"]["right"],
                                                                "preload": again.json()["next"]["preload"]}
        if not gold and choice != "skip":
            log.append((shown["round"] - 1, left, right, choice))
        shown = first.json()["next"]
    return log


def replay(campaign, log, seed):
    """The tournament the log describes, checking that every game shown was a pairing of its round."""
    item_ids = sorted(image_id for image_id, image in campaign["images"].items() if image.in_tournament)
    tournament = Tournament(item_ids, rounds=ROUNDS, seed=seed)
    for round_index, left, right, choice in log:
        assert tournament.round == round_index and (left, right) in tournament.pending(), (round_index, left, right)
        tournament.record(left, right, choice)
    assert tournament.done
    return tournament


def test_whole_tournaments_export_what_the_annotators_logs_replay_to(campaign, capsys):
    """Alice prefers low folder indices and answers gold right, Bob the opposite. Each log replays through a
    Tournament with the service's seed (annotator k: seed k) pairing for pairing, so the service showed exactly
    the Swiss pairs; the export's points, Bradley-Terry scores, levels, aggregated levels, gold agreement (1 and
    0) and agreement between the two (Kendall tau of their fits) equal those computed from the logs."""
    logs = {"alice": judge_everything(campaign, "alice", prefer_low=True, gold_right=True),
            "bob": judge_everything(campaign, "bob", prefer_low=False, gold_right=False)}
    assert all(len(log) == ROUNDS * NUM_ITEMS // 2 for log in logs.values())
    # 9 games + 3 gold + 3 skips each, nothing counted twice
    assert judgment_count(campaign) == 2 * (9 + 3 + 3)
    progress = campaign["client"].get("/api/progress", headers=headers(campaign, "alice")).json()
    assert progress | {"annotator": "alice"} == {
        "annotator": "alice", "campaign": "study", "round": 3, "rounds": 3, "done": True, "judged_in_round": 4,
        "pairs_in_round": 4, "judged_total": 12, "skipped_total": 3}

    out = campaign["tmp"] / "levels.json"
    assert main(["export", "--db", campaign["db"], "--name", "study", "--out", str(out)]) == 0
    exported = json.loads(out.read_text())
    items = sorted(image_id for image_id, image in campaign["images"].items() if image.in_tournament)
    index = {image_id: position for position, image_id in enumerate(items)}
    assert [row["item"] for row in exported["items"]] == campaign["names"]
    fits = {}
    for seed, (name, log) in enumerate(logs.items()):
        tournament = replay(campaign, log, seed)
        judgments = [(index[left], index[right], choice) for _, left, right, choice in log]
        fits[name] = ranking.bradley_terry(NUM_ITEMS, judgments, num_bootstrap=200, confidence=0.9)
        points = {standing.item_id: standing.points for standing in tournament.standings()}
        np.testing.assert_allclose([row[f"{name}:bt"] for row in exported["items"]], fits[name].scores, atol=1e-9)
        np.testing.assert_allclose([row[f"{name}:bt_low"] for row in exported["items"]], fits[name].lower, atol=1e-9)
        np.testing.assert_allclose([row[f"{name}:bt_high"] for row in exported["items"]], fits[name].upper, atol=1e-9)
        assert [row[f"{name}:points"] for row in exported["items"]] == [points[item] for item in items]
        assert [row[f"{name}:level"] for row in exported["items"]] == list(
            ranking.levels_from_scores(fits[name].scores, 10))
    # Alice's best item is img00 and Bob's the last: opposite orders
    assert int(np.argmax(fits["alice"].scores)) == 0 and int(np.argmax(fits["bob"].scores)) == NUM_ITEMS - 1
    aggregate = ranking.aggregate_annotators(NUM_ITEMS, [[(index[a], index[b], c) for _, a, b, c in log]
                                                         for log in logs.values()])
    assert [row["level"] for row in exported["items"]] == list(ranking.levels_from_scores(aggregate.scores, 10))
    tau = metrics.kendall_tau_b(fits["alice"].scores, fits["bob"].scores)
    assert tau < -0.5
    # The raw judgments, for a Bradley-Terry scorer: each annotator's Swiss games as the log has them (gold
    # checks and skips are not games), the same rows in the CSV export's pairs manifest.
    assert exported["judgments"] == [{"image_a": campaign["names"][index[left]],
                                      "image_b": campaign["names"][index[right]], "outcome": choice, "annotator": name}
                                     for name, log in logs.items() for _, left, right, choice in log]
    assert main(["export", "--db", campaign["db"], "--name", "study", "--out", str(campaign["tmp"] / "x.csv")]) == 0
    with open(campaign["tmp"] / "x.pairs.csv", newline="") as f:
        assert list(csv.DictReader(f)) == exported["judgments"]
    rows = {row["annotator"]: row for row in exported["annotators"]}
    assert (rows["alice"]["gold_agreement"], rows["bob"]["gold_agreement"]) == (1.0, 0.0)
    assert rows["alice"]["gold_judged"] == rows["bob"]["gold_judged"] == 3
    assert rows["alice"]["agreement_with_others"] == pytest.approx(tau)

    capsys.readouterr()
    assert main(["status", "--db", campaign["db"]]) == 0
    status = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    # annotator, round, in round, judged, skipped, gold agreement, (gold judged), vs others, state
    assert status["alice"] == ["alice", "3/3", "4/4", "12", "3", "1.00", "(3)", f"{tau:.2f}", "done"]
    assert status["bob"] == ["bob", "3/3", "4/4", "12", "3", "0.00", "(3)", f"{tau:.2f}", "done"]


def test_errors_answer_4xx_and_change_nothing(campaign):
    """Another annotator's pair is 403, an unknown pair 404, a judged pair judged differently (also from an
    earlier round: a stale round) or a pair that is not the current one 409, malformed bodies 422, missing or
    wrong tokens 401; afterwards the judgments and the next pair are as before."""
    client = campaign["client"]
    alice, bob = headers(campaign, "alice"), headers(campaign, "bob")
    first = client.get("/api/next", headers=alice).json()
    while first["round"] == 1:  # finish round 1
        previous = first
        first = client.post("/api/judgments", headers=alice, json={"pair_id": first["pair_id"], "choice": "left"}
                            ).json()["next"]
    before, shown_before = judgment_count(campaign), client.get("/api/next", headers=alice).json()
    bob_pair = client.get("/api/next", headers=bob).json()["pair_id"]
    queued = client.get("/api/next", headers=alice).json()
    attempts = {
        403: [(alice, {"pair_id": bob_pair, "choice": "left"})],
        404: [(alice, {"pair_id": 10_000, "choice": "left"})],
        409: [(alice, {"pair_id": previous["pair_id"], "choice": "right"}),
              (alice, {"pair_id": queued["pair_id"] + 1, "choice": "left"})],
        401: [({}, {"pair_id": queued["pair_id"], "choice": "left"}),
              ({"Authorization": "Bearer not-a-token"}, {"pair_id": queued["pair_id"], "choice": "left"})],
    }
    for status, calls in attempts.items():
        for call_headers, body in calls:
            response = client.post("/api/judgments", headers=call_headers, json=body)
            assert response.status_code == status, (status, body, response.text)
            assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    stale = client.post("/api/judgments", headers=alice, json={"pair_id": previous["pair_id"], "choice": "right"})
    assert "round 1" in stale.json()["detail"] and "round 2" in stale.json()["detail"]
    for body in (b"{not json", b"[]", b'{"pair_id": 1}', b'{"pair_id": 1, "choice": "up"}',
                 b'{"pair_id": "x", "choice": "left"}'):
        response = client.post("/api/judgments", headers=alice | {"Content-Type": "application/json"}, content=body)
        assert response.status_code == 422 and response.json()["detail"].startswith("malformed request"), body
    assert client.get("/api/next").status_code == 401
    assert judgment_count(campaign) == before
    assert client.get("/api/next", headers=alice).json()["pair_id"] == shown_before["pair_id"]


def test_undo_within_the_round_only_and_skip_requeues(campaign):
    """Undo removes the last judgment and shows its pair again, also twice in a row and for a skip (whose
    requeued copy goes); with nothing judged, or once the round it closed has been followed by the next one,
    it is 409 and changes nothing."""
    client, alice = campaign["client"], headers(campaign, "alice")
    assert client.delete("/api/judgments/last", headers=alice).status_code == 409
    start = client.get("/api/next", headers=alice).json()
    second = client.post("/api/judgments", headers=alice, json={"pair_id": start["pair_id"], "choice": "left"}
                         ).json()["next"]
    skipped = client.post("/api/judgments", headers=alice, json={"pair_id": second["pair_id"], "choice": "skip"}
                          ).json()["next"]
    assert skipped["progress"]["pairs_in_round"] == start["progress"]["pairs_in_round"]
    assert skipped["progress"]["judged_in_round"] == 1 and skipped["progress"]["skipped_total"] == 1
    undone = client.delete("/api/judgments/last", headers=alice).json()
    assert undone["undone"] == {"pair_id": second["pair_id"], "choice": "skip"}
    assert undone["next"]["pair_id"] == second["pair_id"] and undone["next"]["progress"]["skipped_total"] == 0
    undone = client.delete("/api/judgments/last", headers=alice).json()
    assert undone["undone"] == {"pair_id": start["pair_id"], "choice": "left"}
    assert undone["next"]["pair_id"] == start["pair_id"] and undone["next"]["progress"]["judged_total"] == 0
    shown = undone["next"]
    while shown["round"] == 1:
        shown = client.post("/api/judgments", headers=alice, json={"pair_id": shown["pair_id"], "choice": "tie"}
                            ).json()["next"]
    before = judgment_count(campaign)
    refused = client.delete("/api/judgments/last", headers=alice)
    assert refused.status_code == 409 and "round 2" in refused.json()["detail"]
    assert judgment_count(campaign) == before
    assert client.get("/api/next", headers=alice).json()["pair_id"] == shown["pair_id"]


def test_images_only_through_urls_signed_for_the_annotators_campaign(campaign, tmp_path):
    """The signed URL returns the file's bytes; a changed signature, another annotator's id, an expired URL are
    403; an image of another campaign (even with a valid signature of this one's key) is 404; a file deleted
    from disk is a 404 that names it."""
    client, alice = campaign["client"], headers(campaign, "alice")
    shown = client.get("/api/next", headers=alice).json()
    while not campaign["images"][shown["left"]["id"]].in_tournament:  # a gold pair first: judge it
        shown = client.post("/api/judgments", headers=alice, json={"pair_id": shown["pair_id"], "choice": "left"}
                            ).json()["next"]
    left = client.get(shown["left"]["url"])
    assert left.status_code == 200 and left.headers["content-type"] == "image/png"
    assert left.content == (tmp_path / "images" / campaign["images"][shown["left"]["id"]].path).read_bytes()
    bob_id = 2
    assert client.get(shown["left"]["url"][:-4] + "0000").status_code == 403
    assert client.get(shown["left"]["url"].replace("annotator=1", f"annotator={bob_id}")).status_code == 403
    with sessions(make_engine(campaign["db"]))() as session:
        from annotate.models import Campaign

        key = session.scalar(select(Campaign.signing_key))
    expired = auth.signed_image_url(key, 1, shown["left"]["id"], now=time.time() - 2 * auth.URL_LIFETIME_S)
    assert client.get(expired).status_code == 403
    make_images(tmp_path / "other", 2)
    create_campaign(campaign["db"], tmp_path / "other", "other", ["carol"], 1, tmp_path)
    with sessions(make_engine(campaign["db"]))() as session:
        foreign = session.scalar(select(func.max(Image.id)))
    assert client.get(auth.signed_image_url(key, 1, foreign)).status_code == 404
    image = campaign["images"][shown["left"]["id"]]
    (tmp_path / "images" / image.path).unlink()
    missing = client.get(shown["left"]["url"])
    assert missing.status_code == 404 and image.path in missing.json()["detail"]
