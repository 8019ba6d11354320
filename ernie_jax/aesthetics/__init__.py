"""Aesthetic annotation and scoring: Swiss pairing, Bradley-Terry ranking, rank metrics (numpy/JAX only)."""
