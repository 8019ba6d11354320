"""The Swiss-tournament annotation service: a web page, its HTTP API and database.

Each annotator runs a whole tournament of their own over a campaign's images (the ERNIE-Image protocol,
reference/training_algorithms.md section 3); `ernie_jax.aesthetics.swiss` pairs the rounds and
`ernie_jax.aesthetics.ranking` turns the judgments into scores and levels. This package lives outside the
library: `ernie_jax` never imports it, and its web and database dependencies are in
`requirements-annotate.txt`. Usage and the HTTP API: docs/annotation.md.
"""
