"""`python -m annotate`: create's tokens, every subcommand's --help, status, and bad input that gets one clear
error, exit code 1 and leaves the database and the tokens file untouched."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from annotate.__main__ import main
from annotate.db import make_engine, sessions
from annotate.models import Annotator, Campaign, Pair
from tests.annotate_servers import REPO, create_campaign, make_images, run_cli


def test_create_prints_tokens_and_writes_them_for_the_owner_only(tmp_path):
    """A real `create` process: exit 0, one line per annotator with a token whose SHA-256 the database holds (not
    the token), the same lines in a mode-0600 file, each annotator's first round queued (3 pairs of 6 images)."""
    make_images(tmp_path / "images", 6)
    db = tmp_path / "a.db"
    result = run_cli("create", "--db", str(db), "--images", str(tmp_path / "images"), "--name", "study",
                     "--annotators", "ann,ben,cy", "--rounds", "2", "--url", "http://annotate.example:9000",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tokens_file = tmp_path / "study.tokens.tsv"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    rows = [line.split("\t") for line in tokens_file.read_text().splitlines()]
    assert [row[0] for row in rows] == ["ann", "ben", "cy"]
    for name, token, url in rows:
        assert f"{name}\t{token}\t{url}" in result.stdout and url == f"http://annotate.example:9000/#token={token}"
    with sessions(make_engine(str(db)))() as session:
        stored = dict(session.execute(select(Annotator.name, Annotator.token_sha256)).all())
        assert stored == {name: hashlib.sha256(token.encode()).hexdigest() for name, token, _ in rows}
        assert session.scalar(select(func.count(Pair.id))) == 3 * 3


@pytest.mark.parametrize("command", ["create", "serve", "status", "export", "upgrade"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--db" in capsys.readouterr().out


def _bad_inputs(tmp_path):
    """(name, create arguments, a phrase the error must contain) for bad inputs to create."""
    good = tmp_path / "good"
    make_images(good, 4)
    not_image = tmp_path / "not_image"
    make_images(not_image, 3)
    (not_image / "notes.png").write_text("not a picture")
    truncated = tmp_path / "truncated"
    make_images(truncated, 3, size=64)
    data = (truncated / "img01.png").read_bytes()
    (truncated / "img01.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty").mkdir()
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("good/img00.png\ngood/missing.png\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("../etc/passwd\ngood/img00.png\n")
    bad_gold = tmp_path / "gold.csv"
    bad_gold.write_text("best,worst\ngood/img00.png,good/img01.png\n")
    return [
        ("non-image", ["--images", str(not_image)], "notes.png is not a readable image"),
        ("truncated", ["--images", str(truncated)], "img01.png is not a readable image"),
        ("empty folder", ["--images", str(tmp_path / "empty")], "holds no files"),
        ("no such folder", ["--images", str(tmp_path / "nowhere")], "no such folder or manifest"),
        ("missing file", ["--images", str(manifest)], "cannot read image"),
        ("outside root", ["--images", str(outside)], "lies outside"),
        ("gold header", ["--images", str(good), "--gold", str(bad_gold)], "winner,loser"),
        ("too many rounds", ["--images", str(good), "--rounds", "9"], "rounds must be"),
        ("duplicate annotator", ["--images", str(good), "--annotators", "a,b,a"], "lists a name twice"),
        ("duplicate name", ["--images", str(good), "--name", "taken"], "exists already"),
        ("bad name", ["--images", str(good), "--name", "../up"], "campaign name"),
        ("gold rate", ["--images", str(good), "--gold-rate", "0.2"], "needs gold pairs"),
    ]


def test_bad_create_input_is_one_error_and_writes_nothing(tmp_path, capsys):
    db = str(tmp_path / "a.db")
    make_images(tmp_path / "first", 4)
    create_campaign(db, tmp_path / "first", "taken", ["a"], 1, tmp_path)
    capsys.readouterr()
    for label, arguments, phrase in _bad_inputs(tmp_path):
        defaults = {"--name": "fresh", "--annotators": "a,b"}
        given = dict(zip(arguments[::2], arguments[1::2], strict=True))
        tokens_file = tmp_path / f"{label}.tsv"
        argv = ["create", "--db", db, "--tokens", str(tokens_file)]
        for flag, value in (defaults | given).items():
            argv += [flag, value]
        assert main(argv) == 1, label
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and phrase in error, (label, error)
        assert not tokens_file.exists(), label
    with sessions(make_engine(db))() as session:
        assert session.scalars(select(Campaign.name)).all() == ["taken"]
        assert session.scalar(select(func.count(Annotator.id))) == 1


def test_commands_on_a_missing_database_or_campaign_fail_clearly(tmp_path, capsys):
    """status/export on a file that is not there do not create it; export of an unknown campaign or to an
    unknown format names the problem; on a campaign without judgments both work."""
    missing = tmp_path / "missing.db"
    for argv in (["status", "--db", str(missing)], ["export", "--db", str(missing), "--name", "x", "--out", "x.csv"]):
        assert main(argv) == 1
        assert "no database file" in capsys.readouterr().err
    assert not missing.exists()
    db = str(tmp_path / "a.db")
    make_images(tmp_path / "images", 4)
    create_campaign(db, tmp_path / "images", "study", ["a"], 2, tmp_path)
    capsys.readouterr()
    assert main(["export", "--db", db, "--name", "nope", "--out", str(tmp_path / "x.csv")]) == 1
    assert "no campaign named 'nope'" in capsys.readouterr().err
    assert main(["export", "--db", db, "--name", "study", "--out", str(tmp_path / "x.txt")]) == 1
    assert ".csv or .json" in capsys.readouterr().err
    assert main(["export", "--db", db, "--name", "study", "--out", str(tmp_path / "x.csv"), "--exclude", "a"]) == 1
    assert "leaves no annotator" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))
    # before the first judgment: status and export work, every score 0 and every level the same
    assert main(["status", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["a", "1/2", "0/2", "0", "0", "-", "(0)", "-",
                                                               "judging"]
    assert main(["export", "--db", db, "--name", "study", "--out", str(tmp_path / "x.json")]) == 0
    items = json.loads((tmp_path / "x.json").read_text())["items"]
    assert {row["a:bt"] for row in items} == {0.0} and len({row["level"] for row in items}) == 1


def test_serve_refuses_missing_images_and_upgrade_is_idempotent(tmp_path, capsys):
    """`serve` names a deleted image file before it binds a port (and starts once --images points at a copy);
    `upgrade` on an up-to-date database changes nothing."""
    db = str(tmp_path / "a.db")
    make_images(tmp_path / "images", 4)
    create_campaign(db, tmp_path / "images", "study", ["a"], 2, tmp_path)
    assert main(["upgrade", "--db", db]) == 0
    (tmp_path / "images" / "img02.png").unlink()
    capsys.readouterr()
    assert main(["serve", "--db", db, "--port", "1"]) == 1
    error = capsys.readouterr().err
    assert "1 image files of the database are missing" in error and "img02.png" in error


def test_the_library_imports_nothing_of_the_service():
    """ernie_jax (the aesthetics modules included) imports neither this package nor its web and database
    dependencies: a fresh interpreter that imports them has none of those modules loaded."""
    code = ("import sys, ernie_jax, ernie_jax.aesthetics.swiss, ernie_jax.aesthetics.ranking\n"
            "service = {'annotate', 'fastapi', 'starlette', 'sqlalchemy', 'alembic', 'uvicorn', 'psycopg'}\n"
            "print(sorted(service & {name.split('.')[0] for name in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]"
    importing = [path for path in (REPO / "ernie_jax").rglob("*.py")
                 if re.search(r"^\s*(import|from) annotate\b", path.read_text(), re.MULTILINE)]
    assert importing == []
