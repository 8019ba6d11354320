"""A 5x7 pixel font for the words of the synthetic shapes dataset.

Words are drawn from this table instead of a system font so that the rendered pixels are the same on
every machine and Pillow version, and so that the evaluation can read words back by template matching
against exactly what was drawn. Only the capitals the dataset's words use are defined.
"""

from __future__ import annotations

import numpy as np

GLYPH_HEIGHT = 7
GLYPH_WIDTH = 5
LETTER_GAP = 1  # glyph columns of background between letters

_GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
}

LETTERS = frozenset(_GLYPHS)


def word_size(word: str, scale: int) -> tuple[int, int]:
    """(height, width) in pixels of `word` drawn at integer `scale`."""
    columns = len(word) * GLYPH_WIDTH + (len(word) - 1) * LETTER_GAP
    return GLYPH_HEIGHT * scale, columns * scale


def word_mask(word: str, scale: int) -> np.ndarray:
    """`word` as a bool mask `[7 * scale, (6 * len(word) - 1) * scale]`, each glyph pixel a scale x scale block."""
    if not word:
        raise ValueError("word_mask: empty word")
    unknown = sorted(set(word) - LETTERS)
    if unknown:
        raise ValueError(f"word_mask: no glyph for {unknown} in {word!r}; the font has {''.join(sorted(LETTERS))}")
    if scale < 1:
        raise ValueError(f"word_mask: scale must be >= 1, got {scale}")
    pieces = []
    for i, letter in enumerate(word):
        if i:
            pieces.append(np.zeros((GLYPH_HEIGHT, LETTER_GAP), bool))
        pieces.append(np.array([[c == "#" for c in row] for row in _GLYPHS[letter]], bool))
    mask = np.concatenate(pieces, axis=1)
    return np.kron(mask, np.ones((scale, scale), bool)).astype(bool)
