"""Evaluation of generated images: prompt following on the synthetic shapes domain, rewards (scores of
images against their prompts, `rewards.py`), sample grids."""
