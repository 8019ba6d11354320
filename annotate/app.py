"""The HTTP service: the annotation page, its JSON API and the images (FastAPI; docs/annotation.md).

Every /api call carries `Authorization: Bearer TOKEN` and sees only that annotator's tournament. Images are
fetched by <img> tags, which cannot send that header, so /api/next returns image URLs signed for the
annotator (auth.py); /images checks the signature and that the image belongs to the annotator's campaign.
Handlers are plain functions (FastAPI runs them on its thread pool), each one database transaction.
"""

from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from annotate import auth
from annotate.db import check_current, make_engine
from annotate.errors import AnnotateError
from annotate.judging import Judging, Progress, Who, image_file

STATIC = Path(__file__).resolve().parent / "static"


class ImageRef(BaseModel):
    id: int
    url: str


class ProgressOut(BaseModel):
    annotator: str
    campaign: str
    round: int  # 1-based
    rounds: int
    done: bool
    judged_in_round: int
    pairs_in_round: int
    judged_total: int
    skipped_total: int


class NextOut(BaseModel):
    pair_id: int | None
    left: ImageRef | None
    right: ImageRef | None
    round: int  # 1-based
    rounds: int
    done: bool
    progress: ProgressOut
    preload: list[str]  # the image URLs of the pair after this one, for the page to fetch ahead


class JudgmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: int
    choice: Literal["left", "right", "tie", "skip"]


class JudgmentOut(BaseModel):
    accepted: bool
    duplicate: bool  # the same judgment was already recorded; nothing changed
    next: NextOut


class UndoneOut(BaseModel):
    pair_id: int
    choice: str


class UndoOut(BaseModel):
    undone: UndoneOut
    next: NextOut


def _progress_out(who: Who, progress: Progress) -> ProgressOut:
    return ProgressOut(annotator=who.name, campaign=who.campaign_name, round=progress.round + 1,
                       rounds=progress.rounds, done=progress.done, judged_in_round=progress.judged_in_round,
                       pairs_in_round=progress.pairs_in_round, judged_total=progress.judged_total,
                       skipped_total=progress.skipped_total)


def create_app(db: str, images_root: Path | None = None) -> FastAPI:
    """The service on database DB (a path or URL, at the newest schema). IMAGES_ROOT replaces the tournament
    images' folder recorded at `create` (for a deployment that moved them)."""
    engine = make_engine(db)
    check_current(engine)
    judging = Judging(engine)
    missing = judging.missing_files(images_root)
    if missing:
        raise AnnotateError(f"{len(missing)} image files of the database are missing, e.g. {missing[0]}; "
                            "pass the folder that holds them with --images")
    bearer = HTTPBearer(auto_error=False, description="the annotator's token, as printed by `create`")
    app = FastAPI(title="Swiss-tournament annotation", version="1",
                  description="Each annotator judges image pairs of their own Swiss tournament "
                              "(docs/annotation.md).")

    @app.exception_handler(AnnotateError)
    def _annotate_error(_request: Request, error: AnnotateError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=getattr(error, "status_code", 500))

    @app.exception_handler(RequestValidationError)
    def _bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                             for problem in error.errors())
        return JSONResponse({"detail": f"malformed request: {problems}"}, status_code=422)

    def annotator(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Who:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "send the annotator's token as `Authorization: Bearer TOKEN`",
                                headers={"WWW-Authenticate": "Bearer"})
        who = judging.who(auth.token_digest(credentials.credentials))
        if who is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return who

    CurrentAnnotator = Annotated[Who, Depends(annotator)]

    def next_out(who: Who) -> NextOut:
        pairs, progress = judging.next_pairs(who.annotator_id)

        def ref(image) -> ImageRef:
            return ImageRef(id=image.id, url=auth.signed_image_url(who.signing_key, who.annotator_id, image.id))

        current = pairs[0] if pairs else None
        return NextOut(pair_id=current[0].id if current else None, left=ref(current[1]) if current else None,
                       right=ref(current[2]) if current else None, round=progress.round + 1,
                       rounds=progress.rounds, done=progress.done, progress=_progress_out(who, progress),
                       preload=[ref(image).url for image in pairs[1][1:]] if len(pairs) > 1 else [])

    @app.get("/api/next", response_model=NextOut)
    def get_next(who: CurrentAnnotator) -> NextOut:
        """The pair to judge now (the same until it is judged); `done` with null pair once finished."""
        return next_out(who)

    @app.post("/api/judgments", response_model=JudgmentOut)
    def post_judgment(judgment: JudgmentIn, who: CurrentAnnotator) -> JudgmentOut:
        """Records a judgment of the current pair in one transaction. Posting the same judgment again changes
        nothing (`duplicate`); another annotator's pair is 403, an unknown one 404, a pair already judged
        differently or not the current one 409."""
        recorded = judging.judge(who.annotator_id, judgment.pair_id, judgment.choice)
        return JudgmentOut(accepted=True, duplicate=not recorded, next=next_out(who))

    @app.delete("/api/judgments/last", response_model=UndoOut)
    def undo_last(who: CurrentAnnotator) -> UndoOut:
        """Removes the last judgment if it lies in the current round (409 otherwise); its pair is next again."""
        pair_id, choice = judging.undo_last(who.annotator_id)
        return UndoOut(undone=UndoneOut(pair_id=pair_id, choice=choice), next=next_out(who))

    @app.get("/api/progress", response_model=ProgressOut)
    def get_progress(who: CurrentAnnotator) -> ProgressOut:
        return _progress_out(who, judging.progress(who.annotator_id))

    @app.get("/images/{image_id}", response_class=FileResponse)
    def get_image(image_id: int, annotator: int, expires: int, signature: str) -> FileResponse:
        """An image, for a URL that /api/next signed (valid for an hour)."""
        signing_key = judging.signing_key(annotator)
        if signing_key is None or not auth.url_signature_valid(signing_key, annotator, image_id, expires, signature):
            raise HTTPException(403, "the image URL is expired or not signed for this annotator; GET /api/next again")
        image, campaign = judging.image(annotator, image_id)
        file = image_file(image, campaign, images_root)
        if not file.is_file():
            raise HTTPException(404, f"the image file {image.path} is missing on the server")
        return FileResponse(file, media_type=image.media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
