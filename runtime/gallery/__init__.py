"""Galleries: images and captions encoded once (:mod:`.build`), stored plainly or as FAISS codes
(:mod:`.stores`), their names as line files (:mod:`.items`), a first-stage index saved with them
(:mod:`.first_stage`), opened whole or as shards (:mod:`.gallery`, :mod:`.shards`), indexed on Ray
(:mod:`.ray_index`). Imports the engine layer only."""
