"""Finding and checking a campaign's image files: a folder, a manifest, a gold-pair file.

Every file is opened and fully decoded once at `create`, so a broken file is named then, not in front of an
annotator. Paths are stored relative to their root, so a deployment can move the folder (`serve --images`).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage

from annotate.errors import AnnotateError

# The formats a browser shows in an <img>.
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
               "BMP": "image/bmp"}


@dataclass(frozen=True)
class ImageFile:
    path: str  # POSIX path relative to the root
    sha256: str
    media_type: str


def check_image(root: Path, relative: str) -> ImageFile:
    """Decodes ROOT/RELATIVE fully; raises AnnotateError naming the file if it is missing or not an image."""
    file = root / relative
    try:
        data = file.read_bytes()
    except OSError as error:
        raise AnnotateError(f"cannot read image {file}: {error.strerror or error}") from error
    try:
        with PILImage.open(file) as image:
            image_format = image.format
            image.load()
    except Exception as error:  # Pillow raises many types for undecodable data
        raise AnnotateError(f"{file} is not a readable image ({type(error).__name__}: {error})") from error
    if image_format not in MEDIA_TYPES:
        raise AnnotateError(f"{file} is a {image_format} image, which browsers do not show; "
                            f"use one of {', '.join(sorted(MEDIA_TYPES))}")
    return ImageFile(relative, hashlib.sha256(data).hexdigest(), MEDIA_TYPES[image_format])


def _relative_to(root: Path, path: Path, where: str) -> str:
    path = (root / path).resolve()
    if not path.is_relative_to(root):
        raise AnnotateError(f"{where}: {path} lies outside {root}")
    return path.relative_to(root).as_posix()


def find_images(source: str | Path) -> tuple[Path, list[ImageFile]]:
    """The images of a campaign and the root their paths are relative to.

    SOURCE is a folder (every file below it except hidden ones, sorted) or a manifest: a text file with one
    image path per line, relative to the manifest's folder (blank lines and `#` comments ignored).
    """
    source = Path(source).expanduser().resolve()
    if source.is_dir():
        root = source
        relatives = sorted(file.relative_to(root).as_posix() for file in root.rglob("*")
                           if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts))
        if not relatives:
            raise AnnotateError(f"the image folder {root} holds no files")
    elif source.is_file():
        root = source.parent
        try:
            lines = source.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise AnnotateError(f"cannot read the manifest {source}: {error}") from error
        relatives = [_relative_to(root, Path(line.strip()), f"{source}:{number}")
                     for number, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
        if not relatives:
            raise AnnotateError(f"the manifest {source} lists no images")
        duplicates = sorted({path for path in relatives if relatives.count(path) > 1})
        if duplicates:
            raise AnnotateError(f"the manifest {source} lists {duplicates[0]} more than once")
    else:
        raise AnnotateError(f"--images {source}: no such folder or manifest file")
    images = [check_image(root, relative) for relative in relatives]
    if len(images) < 2:
        raise AnnotateError(f"{source} holds {len(images)} image; a tournament needs at least 2")
    return root, images


def read_gold_pairs(gold_file: str | Path) -> tuple[Path, list[tuple[ImageFile, ImageFile]]]:
    """Gold (calibration) pairs from a CSV file with a `winner,loser` header, paths relative to the file's
    folder; returns that folder and the (winner, loser) images."""
    gold_file = Path(gold_file).expanduser().resolve()
    root = gold_file.parent
    try:
        with gold_file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise AnnotateError(f"cannot read the gold pairs file {gold_file}: {error}") from error
    if not rows or sorted(reader.fieldnames or ()) != ["loser", "winner"]:
        raise AnnotateError(f"{gold_file} must be a CSV file with the header `winner,loser` and at least one row")
    checked: dict[str, ImageFile] = {}
    pairs = []
    for number, row in enumerate(rows, 2):
        where = f"{gold_file}:{number}"
        if not row["winner"] or not row["loser"]:
            raise AnnotateError(f"{where}: a gold pair needs a winner and a loser")
        winner, loser = (_relative_to(root, Path(row[key].strip()), where) for key in ("winner", "loser"))
        if winner == loser:
            raise AnnotateError(f"{where}: the winner and the loser are the same image {winner}")
        for relative in (winner, loser):
            if relative not in checked:
                checked[relative] = check_image(root, relative)
        pairs.append((checked[winner], checked[loser]))
    return root, pairs
