"""What every conversion command shares: atomic output folders and one-line errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from conversions.safetensors_io import CheckpointError


@contextlib.contextmanager
def atomic_directory(destination):
    """Yields a fresh temporary folder beside `destination`, renamed to it only if the block succeeds.

    A failure (or interrupt) removes the temporary folder, so nothing half-written is ever left at
    `destination`. An existing `destination` is refused before any work starts.
    """
    destination = Path(destination)
    if destination.exists():
        raise CheckpointError(f"{destination}: already exists (refusing to overwrite)")
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        # mkdtemp makes a private (0700) folder; the result should have the usual permissions.
        os.chmod(staging, 0o777 & ~umask)
        yield staging
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_command(main, argv=None) -> int:
    """Runs a command's `main(argv)`, turning bad input into `error: ...` on stderr and exit status 1."""
    try:
        main(argv)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
