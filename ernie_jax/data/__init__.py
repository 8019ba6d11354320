"""Training data: sources, aspect-ratio buckets, the resolution curriculum, category-weighted sampling and
the grain pipeline that assembles them (`pipeline.build_pipeline`), and precomputed VAE latents and text
features (`precompute.py` writes them, `precomputed.build_precomputed_pipeline` batches them). Import the
modules directly."""
