"""Offline: captions rewritten into prompt styles by an LLM (the project's Mistral decoder), for SFT caption
diversification (`prompt_styles.StyleMix(rewriter="llm", rewrites=OUT)` reads the result).

    python -m ernie_jax.data.rewrite_captions --model FOLDER --source SOURCE --out OUT \\
        [--styles keywords,request,instruction,composition] [--shard-index I --shard-count N] \\
        [--batch-size 16] [--chunk-size 256] [--max-new-tokens 128] [--dtype float32|bfloat16]

FOLDER is an ERNIE-Image pipeline folder (its prompt enhancer `pe/` with `pe_tokenizer/`) or any
Mistral-architecture causal-LM folder in the transformers layout (config.json, safetensors weights and
tokenizer files together). SOURCE is an image folder or a tfds dataset folder (`precompute.open_source`).

Each record's caption gets, per style, the user message `STYLE_INSTRUCTIONS[style]` + a blank line + the
caption, rendered by the tokenizer's chat template (with the generation prompt; plain "message\\n" when
the tokenizer has none), and the model's greedy continuation up to its eos or `--max-new-tokens` is the
rewrite. Prompts are generated in batches of `--batch-size` rows (padded with one-token rows, so the
decode loop compiles once per 64-token prompt-length bucket).

Host I of N rewrites the records `catalog.shard_indices(len(SOURCE), I, N)` into
`OUT/shard-IIIII-of-NNNNN/`: `job.json` (the job's settings, checked on resume) and
`chunk-KKKKKK.jsonl`, chunk K holding the shard's records K * chunk_size ... (K + 1) * chunk_size - 1,
one JSON line per (record, style): {"index": source index, "style": name, "rewrite": text}. A chunk file
appears only complete (written beside and renamed), so a killed job rerun with the same arguments skips
the chunks it finished and, decoding greedily, writes the same files an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ernie_jax.data.catalog import shard_indices
from ernie_jax.data.prompt_styles import REWRITTEN_STYLES
from ernie_jax.data.sources import record_caption

STYLE_INSTRUCTIONS = {
    "keywords": "Rewrite this image description as a short list of keywords separated by commas, as a user "
                "would type them into an image generator. Keep only the main subject and one or two "
                "attributes. Answer with the keywords only.",
    "request": "Rewrite this image description as a short natural-language request of at most twelve words, "
               "such as 'a red fox in a snowy forest'. Answer with the request only.",
    "instruction": "Rewrite this image description as one instruction to an image generator, starting with a "
                   "verb such as 'Generate', 'Create' or 'Draw'. Answer with the instruction only.",
    "composition": "Rewrite this image description as a detailed composition description: say where every "
                   "element is placed (foreground, background, left, right, top, bottom), then its colours, "
                   "lighting and style. Keep every detail. Answer with the description only.",
}
JOB_FILE = "job.json"


def shard_folder(out: str | os.PathLike, shard_index: int, shard_count: int) -> Path:
    return Path(out) / f"shard-{shard_index:05d}-of-{shard_count:05d}"


def chunk_file(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:06d}.jsonl"


def load_model(folder: str | os.PathLike, dtype: str = "float32"):
    """(causal LM, tokenizer) of a pipeline folder's `pe/` + `pe_tokenizer/`, or of a causal-LM folder."""
    from conversions.mistral import load_prompt_enhancer
    from conversions.safetensors_io import CheckpointError
    from ernie_jax.tokenizer import Tokenizer

    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"--model {root}: not a folder")
    tokenizer_folder = root / "pe_tokenizer" if (root / "pe_tokenizer").is_dir() else root
    if not (tokenizer_folder / "tokenizer.json").is_file():
        raise CheckpointError(f"--model {root}: no tokenizer (pe_tokenizer/tokenizer.json or tokenizer.json)")
    return load_prompt_enhancer(root, dtype), Tokenizer.from_folder(tokenizer_folder)


def style_prompt(tokenizer, caption: str, style: str) -> str:
    """The text the model continues to rewrite `caption` into `style`."""
    message = f"{STYLE_INSTRUCTIONS[style]}\n\n{caption}"
    if tokenizer.chat_template is None:
        return message + "\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)


class Rewriter:
    """Greedy rewrites of (caption, style) pairs by a causal LM, `batch_size` prompts per compiled call."""

    def __init__(self, model, tokenizer, *, batch_size: int, max_new_tokens: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.filler = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0

    def generate(self, prompt_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """New token ids `[B, N]` of right-padded prompts `[B, T]` (one compiled decode loop)."""
        from ernie_jax.models import mistral

        return mistral.generate(self.model, prompt_ids, lengths, max_new_tokens=self.max_new_tokens,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                do_sample=False)

    def __call__(self, pairs: list[tuple[str, str]]) -> list[str]:
        rewrites = []
        for start in range(0, len(pairs), self.batch_size):
            encoded = [self.tokenizer.encode(style_prompt(self.tokenizer, caption, style), truncation=False)
                       for caption, style in pairs[start:start + self.batch_size]]
            lengths = np.ones(self.batch_size, np.int32)
            lengths[: len(encoded)] = [len(ids) for ids in encoded]
            prompt_ids = np.full((self.batch_size, int(lengths.max())), self.filler, np.int32)
            for row, ids in zip(prompt_ids, encoded):
                row[: len(ids)] = ids
            new_ids = self.generate(prompt_ids, lengths)
            rewrites += [self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                         for ids in new_ids[: len(encoded)]]
        return rewrites


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, "utf-8")
    os.replace(staging, path)


def rewrite_shard(rewriter, source, out: str | os.PathLike, styles, *, shard_index: int = 0, shard_count: int = 1,
                  chunk_size: int = 256, settings: dict | None = None, progress: bool = True) -> dict[str, int]:
    """Rewrites this shard's records into `styles` under `out` (layout in the module docstring), skipping
    finished chunks; returns the rewrites per style in the shard's files. `settings` (JSON-able) joins the
    job description that a resumed run must match."""
    indices = shard_indices(len(source), shard_index, shard_count)
    if not indices.size:
        raise ValueError(f"{source!r} has no record in shard {shard_index} of {shard_count}")
    folder = shard_folder(out, shard_index, shard_count)
    job = {"source": repr(source), "records": len(source), "styles": list(styles), "chunk_size": chunk_size,
           **(settings or {})}
    if (folder / JOB_FILE).is_file():
        previous = json.loads((folder / JOB_FILE).read_text("utf-8"))
        if previous != job:
            changed = sorted(key for key in job.keys() | previous.keys() if job.get(key) != previous.get(key))
            raise ValueError(f"{folder} holds a job with other settings ({', '.join(changed)}); use another --out")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / JOB_FILE, json.dumps(job, indent=1) + "\n")
    chunks = [indices[start:start + chunk_size] for start in range(0, len(indices), chunk_size)]
    done = [chunk_file(folder, k).is_file() for k in range(len(chunks))]
    bar = tqdm(total=len(indices), initial=sum(len(c) for c, d in zip(chunks, done) if d),
               desc=f"rewrite shard {shard_index}/{shard_count}", unit="record", disable=not progress)
    for number, (chunk, finished) in enumerate(zip(chunks, done)):
        if finished:
            continue
        pairs = [(int(index), record_caption(source[int(index)]), style) for index in chunk for style in styles]
        rewrites = rewriter([(caption, style) for _, caption, style in pairs])
        lines = [json.dumps({"index": index, "style": style, "rewrite": text}, ensure_ascii=False)
                 for (index, _, style), text in zip(pairs, rewrites)]
        _write_atomically(chunk_file(folder, number), "\n".join(lines) + "\n")
        bar.update(len(chunk))
    bar.close()
    counts = collections.Counter()
    for number in range(len(chunks)):
        for line in chunk_file(folder, number).read_text("utf-8").splitlines():
            counts[json.loads(line)["style"]] += 1
    return {style: counts[style] for style in styles}


def parse_styles(text: str) -> tuple[str, ...]:
    styles = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in styles if s not in REWRITTEN_STYLES]
    if not styles or unknown:
        raise ValueError(f"--styles {text!r}: each must be one of {', '.join(REWRITTEN_STYLES)} (the dense caption "
                         f"needs no rewrite)")
    return styles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ernie_jax.data.rewrite_captions",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder with pe/, or a Mistral causal-LM folder")
    parser.add_argument("--source", required=True, help="image folder or tfds dataset folder")
    parser.add_argument("--out", required=True, help="output folder (a rerun with the same arguments resumes)")
    parser.add_argument("--styles", default=",".join(REWRITTEN_STYLES), help="comma-separated styles to write")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    parser.add_argument("--chunk-size", type=int, default=256, help="records per output file (the resume unit)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--shard-index", type=int, default=0, help="this host's shard of the source")
    parser.add_argument("--shard-count", type=int, default=1)
    args = parser.parse_args(argv)

    styles = parse_styles(args.styles)
    for name in ("batch_size", "chunk_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    shard_indices(0, args.shard_index, args.shard_count)  # validates the shard before any work
    from ernie_jax.data.precompute import open_source

    source = open_source(args.source)
    model, tokenizer = load_model(args.model, args.dtype)
    rewriter = Rewriter(model, tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    settings = {"model": str(Path(args.model).resolve()), "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                "instructions": {style: STYLE_INSTRUCTIONS[style] for style in styles}}
    counts = rewrite_shard(rewriter, source, args.out, styles, shard_index=args.shard_index,
                           shard_count=args.shard_count, chunk_size=args.chunk_size, settings=settings)
    print(f"wrote {shard_folder(args.out, args.shard_index, args.shard_count)}: "
          + ", ".join(f"{style} {count}" for style, count in counts.items()))


if __name__ == "__main__":
    from conversions.common import run_command

    sys.exit(run_command(main))
