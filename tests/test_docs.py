"""Every code block of README.md and BUILD.md runs, so the documentation cannot drift from the code.

A fenced block is `python`, `bash` or `text` (a listing, not code; nothing else is allowed). The line
before a block may carry a marker, an HTML comment that the rendered page hides:

    <!-- doc-test: skip REASON -->                 not run; REASON starts "needs real weights", "needs an
                                                   accelerator" or "this is the test suite itself"
    <!-- doc-test: replace `OLD` `NEW` ... -->     run with each OLD replaced by NEW (smaller sizes, fewer steps:
                                                   the code path is the one written, the work is less)

The blocks run in a scratch folder that holds `ERNIE-Image` (a tiny random pipeline in the released layout,
with a prompt enhancer), `style.safetensors` (a LoRA for it), `DATA` (a few captioned images) and links to
everything in the repository root,
with the repository on PYTHONPATH. A file's Python blocks run in order in one interpreter with 8 emulated CPU
devices (for the mesh examples), so later blocks use the names earlier ones define, as a reader would; each
bash block runs with `bash -euo pipefail` on the one CPU device a user has.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import emulated_devices_flags

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "BUILD.md")
LANGUAGES = ("python", "bash", "text")
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!-- doc-test: (skip|replace) (.*) -->$")
_REPLACEMENT = re.compile(r"`([^`]+)`\s+`([^`]*)`")


@dataclasses.dataclass
class Block:
    document: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None = None
    replacements: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    def runnable_code(self) -> str:
        code = self.code
        for old, new in self.replacements:
            assert old in code, f"{self.where}: the marker replaces `{old}`, which the block does not contain"
            code = code.replace(old, new)
        return code


def code_blocks(document: str) -> list[Block]:
    """The fenced blocks of `document` with their markers; malformed markers and fences fail here."""
    lines = (REPO / document).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{document}:{start + 1}: unclosed code block"
        block = Block(document, start + 1, fence.group(1), "\n".join(lines[start + 1:end]) + "\n")
        assert block.language in LANGUAGES, f"{block.where}: code block language must be one of {LANGUAGES}"
        marker = _MARKER.match(lines[start - 1]) if start else None
        if marker and marker.group(1) == "skip":
            block.skip = marker.group(2).strip()
            assert block.skip, f"{block.where}: a skip marker must say why"
        elif marker:
            block.replacements = tuple(_REPLACEMENT.findall(marker.group(2)))
            assert block.replacements, f"{block.where}: a replace marker needs `OLD` `NEW` pairs"
        blocks.append(block)
        i = end + 1
    return blocks


def _all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in code_blocks(document)]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The folder the blocks run in (see the module docstring)."""
    from conversions.random_checkpoint import main as random_checkpoint
    from tests.test_data import write_folder
    from tests.test_lora import peft_lora, write_lora
    from tests.test_precompute import make_records

    folder = tmp_path_factory.mktemp("docs")
    for entry in REPO.iterdir():
        if entry.name not in (".git", "out"):
            (folder / entry.name).symlink_to(entry)
    random_checkpoint([str(folder / "ERNIE-Image"), "--pipeline", "--with-pe"])
    state, metadata = peft_lora(r=4, lora_alpha=4)
    write_lora(folder / "style.safetensors", state, metadata)
    (folder / "DATA").mkdir()
    write_folder(folder / "DATA", make_records(6))
    return folder


def _environment(devices: int) -> dict[str, str]:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    environment.pop("XLA_FLAGS", None)
    if devices > 1:
        environment["XLA_FLAGS"] = emulated_devices_flags(devices)
    return environment


# Runs the blocks given as JSON on stdin in one namespace; a failure names its block.
_PYTHON_RUNNER = """
import json, sys, traceback
namespace = {"__name__": "__main__"}
for where, code in json.load(sys.stdin):
    print(f"--- {where}", flush=True)
    try:
        exec(compile(code, where, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"block {where} failed")
"""


def test_documents_have_only_known_blocks_and_valid_markers():
    blocks = _all_blocks()
    assert {b.language for b in blocks} <= set(LANGUAGES)
    assert any(b.language == "python" for b in blocks) and any(b.language == "bash" for b in blocks)
    for block in blocks:
        block.runnable_code()  # every replacement applies
    allowed = ("needs real weights", "needs an accelerator", "this is the test suite itself")
    for block in blocks:
        assert block.skip is None or block.skip.startswith(allowed), f"{block.where}: skipped because {block.skip!r}"


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if any(b.language == "python" for b in code_blocks(d))])
def test_python_blocks_run(document, scratch):
    blocks = [b for b in code_blocks(document) if b.language == "python" and b.skip is None]
    payload = json.dumps([(b.where, b.runnable_code()) for b in blocks])
    result = subprocess.run([sys.executable, "-c", _PYTHON_RUNNER], input=payload, cwd=scratch,
                            env=_environment(devices=8), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


@pytest.mark.parametrize("block", [b for b in _all_blocks() if b.language == "bash" and b.skip is None],
                         ids=lambda b: b.where)
def test_bash_block_runs(block, scratch):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.runnable_code()], cwd=scratch,
                            env=_environment(devices=1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{block.where}: {shlex.quote(block.code)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
