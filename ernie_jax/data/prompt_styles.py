"""Prompt styles for SFT caption diversification (ERNIE-Image report, SFT data; reference section 7).

Captioners write dense captions; users type short keywords, requests and instructions. Per record, a
`StyleMix` keeps the dense caption with probability `keep_dense`, else draws one of the rewritten styles
from its weights, and a rewriter turns the caption into that style:

  dense        the original caption
  keywords     short keywords: a few content phrases joined by commas
  request      a natural-language request: one short noun phrase, "a red fox on a log"
  instruction  an instruction: "Generate an image of ..."
  composition  a detailed composition description: every sentence kept, layout first

Rewriters (`StyleMix.rewriter`):
  "rules"   `rule_rewrite`, offline, on any English caption (its rules are in its docstring).
  "shapes"  the bundled shapes dataset's scene grammar (`shapes.styled_prompt`), built from the record's
            scene (`spec`): every rewrite stays in the dataset's vocabulary and the short styles name
            fewer attributes.
  "llm"     the rewrites an LLM wrote (`python -m ernie_jax.data.rewrite_captions`), read from the folder
            `StyleMix.rewrites`.

The choice and the rewrite are a pure function of (mix, source index): `StyledSource` applies them to a
record source, so the image pipeline and `precompute` (whose stored text features are of one caption per
record) see the same caption for a record. It does not change with the epoch for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

STYLES = ("dense", "keywords", "request", "instruction", "composition")
REWRITTEN_STYLES = STYLES[1:]
REWRITERS = ("rules", "shapes", "llm")
# Separates the style draws from any other random stream seeded by the same (seed, index).
_STREAM = 0x57E5

# The rule rewriter's word lists and bounds.
MAX_KEYWORDS = 8
MAX_REQUEST_WORDS = 12
STOPWORDS = frozenset("""
a an the this that these those it its it's there their they them his her he she we our you your i my of in on
at to for from by with without into onto over under above below near behind beside between through across
along around among against toward towards upon within about as than and or but nor so yet while whereas which
who whom whose where when is are was were be been being am has have had do does did can could will would shall
should may might must also very quite just some any each every all both either neither such shows depicts
features showing depicting featuring appears seen visible
""".split())
LAYOUT_WORDS = frozenset("""
left right top bottom center centre middle corner foreground background behind front above below beside upper
lower side edge frame midground horizon centered centred
""".split())
# Captioner lead-ins that no user types ("The image shows ...").
LEAD_INS = tuple(re.compile(pattern, re.IGNORECASE) for pattern in (
    (r"^(the|this) (image|photo|photograph|picture|illustration|artwork|scene|painting|render(ing)?) "
    r"(shows|depicts|features|presents|captures|displays|is of|contains)\s+"),
    r"^in (the|this) (image|photo|picture|scene),?\s+(we see\s+|there (is|are)\s+)?",
    r"^(a|an) (photo|photograph|image|picture|illustration|rendering) (of|showing|depicting)\s+",
    r"^this is\s+",
))
INSTRUCTIONS = ("Generate an image of {}.", "Create a picture of {}.", "Draw {}.", "Make an image showing {}.")
DETERMINERS = frozenset("""
a an the one two three four five six seven eight nine ten some several many
""".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_BREAK = re.compile(r"\s*(?:[,;:(]|\s(?:while|which|where|who|that|as|with)\s)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


@dataclasses.dataclass(frozen=True)
class StyleMix:
    """Which prompt style each record's caption takes.

    weights: style name -> relative weight, over REWRITTEN_STYLES (missing styles weigh 0; normalised).
    keep_dense: probability that a record keeps its dense caption; otherwise a style is drawn from
      `weights` (so a style's share is (1 - keep_dense) * weight / sum of weights).
    seed: the draws of record i come from (seed, i) alone.
    rewriter: "rules", "shapes" or "llm" (see the module docstring).
    rewrites: the rewrite_captions output folder, for rewriter "llm" (and only then).
    """

    weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(REWRITTEN_STYLES, 1.0))
    keep_dense: float = 0.25
    seed: int = 0
    rewriter: str = "rules"
    rewrites: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(REWRITTEN_STYLES))
        if unknown:
            raise ValueError(f"StyleMix: weights name unknown styles {unknown}; the rewritten styles are "
                             f"{REWRITTEN_STYLES} (the dense caption's share is keep_dense)")
        values = np.array([self.weights.get(style, 0.0) for style in REWRITTEN_STYLES], np.float64)
        if not np.all(np.isfinite(values)) or (values < 0).any() or (values.sum() <= 0 and self.keep_dense < 1):
            raise ValueError(f"StyleMix: weights must be non-negative with a positive sum, got {dict(self.weights)}")
        if not 0.0 <= self.keep_dense <= 1.0:
            raise ValueError(f"StyleMix: keep_dense must be in [0, 1], got {self.keep_dense}")
        if self.seed < 0:
            raise ValueError(f"StyleMix: seed must be non-negative, got {self.seed}")
        if self.rewriter not in REWRITERS:
            raise ValueError(f"StyleMix: rewriter {self.rewriter!r} is not one of {REWRITERS}")
        if (self.rewriter == "llm") != bool(self.rewrites):
            raise ValueError("StyleMix: rewrites (a rewrite_captions output folder) is needed with rewriter 'llm' "
                             f"and only then, got rewriter {self.rewriter!r}, rewrites {self.rewrites!r}")
        object.__setattr__(self, "weights", {style: float(self.weights.get(style, 0.0)) for style in REWRITTEN_STYLES})

    @property
    def probabilities(self) -> dict[str, float]:
        """Each style's probability per record, dense included."""
        values = np.array(list(self.weights.values()))
        shares = (1 - self.keep_dense) * values / values.sum() if values.sum() > 0 else values
        return {"dense": self.keep_dense, **dict(zip(REWRITTEN_STYLES, shares.tolist()))}

    def rng(self, index: int) -> np.random.Generator:
        """The generator of record `index`: its style draw, then its rewriter's draws."""
        if index < 0:
            raise ValueError(f"StyleMix: record index must be >= 0, got {index}")
        return np.random.default_rng((self.seed, _STREAM, index))

    def choose(self, rng: np.random.Generator) -> str:
        """The style from record generator `rng` (`rng(index)`, drawn first)."""
        if rng.random() < self.keep_dense:
            return "dense"
        values = np.array(list(self.weights.values()))
        return REWRITTEN_STYLES[int(rng.choice(len(values), p=values / values.sum()))]

    def style_of(self, index: int) -> str:
        return self.choose(self.rng(index))

    def to_dict(self) -> dict:
        """JSON-able fields (`StyleMix(**d)` rebuilds it): what precomputed metadata records."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------- rule rewriter


def _strip_lead_in(text: str) -> str:
    for pattern in LEAD_INS:
        text = pattern.sub("", text, count=1)
    return text.strip()


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _lower_first(text: str) -> str:
    """Lower-cases the first letter unless the first word is an acronym or a name-like "I"."""
    first = text.split(" ", 1)[0]
    if (len(first) > 1 and first[:2].isupper()) or first == "I":
        return text
    return text[:1].lower() + text[1:]


def _with_article(phrase: str) -> str:
    """A noun phrase led by a determiner: "the dog" -> "a dog", "old car" -> "an old car"."""
    words = phrase.split()
    if not words:
        return phrase
    if words[0].lower() == "the":
        words = words[1:] or words
    elif words[0].lower() in DETERMINERS or words[0][0].isdigit():
        return phrase
    article = "an" if words[0][0].lower() in "aeiou" else "a"
    return " ".join([article, *words])


def _subject(caption: str, max_words: int) -> str:
    """The first sentence without its lead-in, cut at its first clause break and to `max_words`, without
    end punctuation, lower-cased first."""
    sentences = _sentences(_strip_lead_in(caption))
    first = _strip_lead_in(sentences[0]) if sentences else ""
    first = _CLAUSE_BREAK.split(first, maxsplit=1)[0]
    words = first.rstrip(" .!?").split()[:max_words]
    return _lower_first(" ".join(words))


def keyword_phrases(caption: str) -> list[str]:
    """The caption's content phrases: maximal runs of non-stopwords between stopwords and punctuation,
    lower-cased, first occurrence kept, in order."""
    phrases, current = [], []
    for token in _WORD.findall(_strip_lead_in(caption)) + ["."]:
        word = token.lower()
        if word[0].isalnum() and word not in STOPWORDS:
            current.append(word)
            continue
        if current:
            phrase = " ".join(current)
            if phrase not in phrases:
                phrases.append(phrase)
            current = []
    return phrases


def rule_rewrite(caption: str, style: str, rng: np.random.Generator) -> str:
    """`caption` (English, any length) rewritten into `style` by rules:

      dense        unchanged.
      keywords     the first MAX_KEYWORDS `keyword_phrases` joined by ", " ("red fox, mossy log, dawn").
      request      the first sentence's subject clause: captioner lead-ins ("The image shows") removed, cut
                   at the first clause break (, ; : ( and while/which/where/who/that/as/with) and to
                   MAX_REQUEST_WORDS words, led by a/an ("the dog" -> "a dog").
      instruction  one of INSTRUCTIONS (drawn from `rng`) around the first sentence without its lead-in
                   and end punctuation, led by a/an.
      composition  every sentence kept (lead-in removed), those naming a place (LAYOUT_WORDS) first, in
                   their order, then the others.
    A caption with no content word rewrites to itself.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")
    if style == "dense" or not keyword_phrases(caption):
        return caption
    if style == "keywords":
        return ", ".join(keyword_phrases(caption)[:MAX_KEYWORDS])
    if style == "request":
        return _with_article(_subject(caption, MAX_REQUEST_WORDS))
    if style == "instruction":
        sentence = _sentences(_strip_lead_in(caption))[0].rstrip(" .!?")
        template = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        return template.format(_with_article(_lower_first(_strip_lead_in(sentence))))
    sentences = _sentences(_strip_lead_in(caption))
    sentences[0] = sentences[0][:1].upper() + sentences[0][1:]
    placed = [s for s in sentences if LAYOUT_WORDS & {w.lower() for w in _WORD.findall(s)}]
    return " ".join(placed + [s for s in sentences if s not in placed])


# ----------------------------------------------------------------------------------------------- sources


def read_rewrites(folder: str | Path) -> dict[tuple[int, str], str]:
    """(source index, style) -> rewrite, from every `*.jsonl` under a rewrite_captions output folder."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.jsonl"))
    if not files:
        raise ValueError(f"{folder}: no rewrite files (*.jsonl written by python -m ernie_jax.data.rewrite_captions)")
    rewrites = {}
    for path in files:
        for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
                rewrites[int(row["index"]), str(row["style"])] = str(row["rewrite"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{number}: not a rewrite line ({error!r})") from None
    return rewrites


class StyledSource:
    """`source` with each record's caption in the style `mix` gives its index: `source[i]` is the
    record with `caption` rewritten and `caption_style` (a STYLES name) added. Random access, like the
    source; the same (mix, i) always gives the same caption."""

    def __init__(self, source, mix: StyleMix):
        self.source = source
        self.mix = mix
        self._rewrites = None
        if mix.rewriter == "llm":
            self._rewrites = read_rewrites(mix.rewrites)
            self._check_coverage()

    def _check_coverage(self) -> None:
        """Every record needs a rewrite in every style it can draw: a missing one would make the record
        fail to load, and the pipeline would replace it instead of training on it."""
        for style, weight in self.mix.weights.items():
            covered = {index for index, written in self._rewrites if written == style and index < len(self.source)}
            if weight > 0 and self.mix.keep_dense < 1 and len(covered) < len(self.source):
                raise ValueError(f"{self.mix.rewrites}: {len(self.source) - len(covered)} of {len(self.source)} "
                                 f"records have no {style!r} rewrite (rewrite every shard with that style, or give "
                                 f"it weight 0)")

    def __len__(self) -> int:
        return len(self.source)

    def rewrite(self, record: dict, index: int) -> tuple[str, str]:
        """(style, caption) of `record`, the source's record `index`."""
        from ernie_jax.data.sources import record_caption

        rng = self.mix.rng(index)
        style = self.mix.choose(rng)
        caption = record_caption(record)
        if style == "dense":
            return style, caption
        if self.mix.rewriter == "rules":
            return style, rule_rewrite(caption, style, rng)
        if self.mix.rewriter == "shapes":
            from ernie_jax.data import shapes

            scene = shapes.Scene.from_json(record["spec"]) if "spec" in record else shapes.parse_caption(caption)
            return style, shapes.styled_prompt(scene, style, rng).text
        if (index, style) not in self._rewrites:
            raise KeyError(f"{self.mix.rewrites}: no {style!r} rewrite of record {index}")
        return style, self._rewrites[index, style]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        record = dict(self.source[index])
        style, record["caption"] = self.rewrite(record, index)
        record["caption_style"] = style
        return record

    def __repr__(self) -> str:
        return f"StyledSource({self.source!r}, {self.mix})"


def styled(source, mix: StyleMix | None):
    """`source` as a StyledSource of `mix`; `source` itself without a mix."""
    return source if mix is None else StyledSource(source, mix)
