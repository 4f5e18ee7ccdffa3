"""Semantic IDs: the tokenizer stage of TIGER (Rajput et al., NeurIPS 2023).

TIGER represents every item by a short tuple of codes, its *semantic ID* (e.g. ``(183, 70, 232, 0)``),
and trains a sequence-to-sequence model to decode the next item's codes. This package turns items
into such tuples and stores them in one on-disk format that the trainer reads:

* ``table.py``: the format (``<dir>/semantic_ids.parquet`` + ``<dir>/manifest.json``), its reader
  with validation, the collision-resolution token, a random baseline tokenizer, and the converter of
  the published Amazon Beauty reference IDs (``python -m data_pipeline semantic-ids-reference``).
* the learned tokenizer (item text embeddings -> RQ-VAE codes) writes the same format; it lives in
  its own modules of this package (``python -m data_pipeline semantic-ids``).
"""
