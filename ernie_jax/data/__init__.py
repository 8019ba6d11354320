"""Training data: sources, aspect-ratio buckets, the resolution curriculum, category-weighted sampling and
the grain pipeline that assembles them (`pipeline.build_pipeline`), precomputed VAE latents and text
features (`precompute.py` writes them, `precomputed.build_precomputed_pipeline` batches them), and
preference pairs for DPO (`preferences.py` from manifests, `generated_pairs.py` from the model and a
reward; `preferences.build_preference_pipeline` batches them), and the frozen teacher's ODE pairs for DMD's
regression term (`ode_pairs.py`, batched with their precomputed records). Import the modules directly."""
