"""Evaluation protocols of docs/METHOD.md section 7, model-agnostic.

Every evaluator takes an `embed_fn(images_uint8_bgr (b, H, W, 3)) ->
(unit embeddings (b, D), norms (b,))` for a fixed batch size b, plus a data
root, and returns a flat dict of metrics:

  verification.evaluate_bin / evaluate_pairs   LFW-style .bin sets (+ CRLFW)
  tinyface.evaluate_tinyface                   rank-1/5/20 with distractors
  scface.evaluate_scface                       rank-1 per distance
  ijb.evaluate_ijb                             IJB-B/C 1:1 TAR at FAR

The metric functions (`verification_metrics`, `tinyface_metrics`,
`scface_metrics`, `ijb_metrics`, ...) work on embeddings alone;
`extract.extract_embeddings` does batching and flip fusion; `report` prints
and stores results.
"""
