"""Evaluation of generated images: prompt following on the synthetic shapes domain, sample grids."""
