"""Search over a gallery: exhaustive, or two-stage (the gallery's first stage, then the fused
score) (:mod:`.searcher`). Imports the gallery and engine layers only."""
