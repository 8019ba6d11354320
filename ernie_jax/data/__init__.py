"""Training data: sources, aspect-ratio buckets, the resolution curriculum, category-weighted sampling and
the grain pipeline that assembles them (`pipeline.build_pipeline`). Import the modules directly."""
