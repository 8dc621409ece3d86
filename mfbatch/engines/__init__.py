"""Other ways to run a stage than in this process (mfbatch.engines.ray_score: Ray)."""
