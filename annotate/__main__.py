"""`python -m annotate {create,serve,status,export,upgrade}`: the annotation service's commands (docs/annotation.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy.exc import ArgumentError, OperationalError

from annotate.errors import AnnotateError

DB_HELP = "a SQLite file, or a SQLAlchemy URL such as postgresql+psycopg://user:password@host/database"


def _create(args) -> None:
    from annotate.campaign import create_campaign, parse_annotators
    from annotate.db import make_engine

    tokens_file = Path(args.tokens or f"{args.name}.tokens.tsv").resolve()
    credentials = create_campaign(make_engine(args.db, must_exist=False), args.name, args.images,
                                  parse_annotators(args.annotators), args.rounds, args.seed, args.gold, args.gold_rate,
                                  args.url, tokens_file)
    print(f"campaign {args.name}: one tournament for each of {len(credentials)} annotators")
    for credential in credentials:
        print(f"{credential.annotator}\t{credential.token}\t{credential.url}")
    print(f"tokens written to {tokens_file} (readable only by you); send each annotator their URL")


def _serve(args) -> None:
    import uvicorn

    from annotate.app import create_app

    app = create_app(args.db, Path(args.images).resolve() if args.images else None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _status(args) -> None:
    from annotate.db import check_current, make_engine, sessions
    from annotate.report import campaign_reports, status_text

    engine = make_engine(args.db)
    check_current(engine)
    with sessions(engine, read_only=True)() as session:
        print(status_text(campaign_reports(session, args.name)), end="")


def _export(args) -> None:
    from annotate.db import check_current, make_engine, sessions
    from annotate.report import campaign_reports, write_export

    engine = make_engine(args.db)
    check_current(engine)
    with sessions(engine, read_only=True)() as session:
        [report] = campaign_reports(session, args.name)
    exclude = {name.strip() for name in args.exclude.split(",") if name.strip()}
    for path in write_export(report, Path(args.out).resolve(), exclude, args.bootstrap):
        print(f"wrote {path}")


def _upgrade(args) -> None:
    from annotate.db import make_engine, upgrade

    upgrade(make_engine(args.db))
    print("the database schema is up to date")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m annotate", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="a campaign: its images, annotators and first rounds",
                                 description="Creates a campaign: one Swiss tournament per annotator over the same "
                                             "images. Prints each annotator's token and page URL and writes them "
                                             "to a file only you can read.")
    create.add_argument("--db", required=True, help=DB_HELP)
    create.add_argument("--images", required=True, help="a folder of images, or a manifest: one image path per "
                                                        "line, relative to the manifest's folder")
    create.add_argument("--name", required=True, help="the campaign's name, unique in the database "
                                                      "(letters, digits, _ . @ -)")
    create.add_argument("--annotators", required=True, help="comma-separated annotator names: a,b,c")
    create.add_argument("--rounds", type=int, help="Swiss rounds (default: ceil(log2 images), capped)")
    create.add_argument("--seed", type=int, default=0, help="pairing seed; annotator k gets SEED + k")
    create.add_argument("--gold", help="gold pairs, a CSV file `winner,loser` with paths relative to its folder")
    create.add_argument("--gold-rate", type=float, help="share of shown pairs that are gold (default 0.1 with "
                                                        "--gold)")
    create.add_argument("--url", default="http://127.0.0.1:8000", help="the address annotators will open")
    create.add_argument("--tokens", help="where to write the tokens (default NAME.tokens.tsv; must not exist)")
    create.set_defaults(run=_create)

    serve = commands.add_parser("serve", help="run the web service", description="Serves the page and the API.")
    serve.add_argument("--db", required=True, help=DB_HELP)
    serve.add_argument("--images", help="the tournament images' folder, if not where `create` found them")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=_serve)

    status = commands.add_parser("status", help="each annotator's progress and calibration",
                                 description="Prints each annotator's round, counts, agreement with gold pairs "
                                             "and mean Kendall tau with the other annotators.")
    status.add_argument("--db", required=True, help=DB_HELP)
    status.add_argument("--name", help="only this campaign")
    status.set_defaults(run=_status)

    export = commands.add_parser("export", help="points, Bradley-Terry scores and levels to CSV or JSON",
                                 description="Writes one row per image: per annotator its Swiss points, "
                                             "Bradley-Terry score with a 90% bootstrap interval and level 1-10, "
                                             "and the level aggregated over annotators; plus one row per "
                                             "annotator with its calibration (FILE.annotators.csv beside a CSV).")
    export.add_argument("--db", required=True, help=DB_HELP)
    export.add_argument("--name", required=True, help="the campaign")
    export.add_argument("--out", required=True, help="FILE.csv or FILE.json")
    export.add_argument("--exclude", default="", help="annotators to leave out of the aggregated level: a,b")
    export.add_argument("--bootstrap", type=int, default=200, help="resamples for the 90%% intervals (each a "
                                                                   "Bradley-Terry fit; fewer for big campaigns)")
    export.set_defaults(run=_export)

    upgrade = commands.add_parser("upgrade", help="bring the database schema to this version",
                                  description="Applies the schema migrations this version needs (back up first).")
    upgrade.add_argument("--db", required=True, help=DB_HELP)
    upgrade.set_defaults(run=_upgrade)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except AnnotateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OperationalError, ArgumentError) as error:
        print(f"error: cannot use the database {args.db}: {getattr(error, 'orig', None) or error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
