"""Evaluation protocols of docs/METHOD.md section 7, model-agnostic.

Every evaluator takes an `embed_fn(images_uint8_bgr (b, H, W, 3)) ->
(unit embeddings (b, D), norms (b,))` for a fixed batch size b, plus a data
root, and returns a flat dict of metrics:

  verification.evaluate_bin / evaluate_pairs   LFW-style .bin sets (+ CRLFW)
  tinyface.evaluate_tinyface                   rank-1/5/20 with distractors
  scface.evaluate_scface                       rank-1 per distance
  ijb.evaluate_ijb                             IJB-B/C 1:1 TAR at FAR and
                                               1:N (both conventions)
  own_data.evaluate_folder                     folders of people (and
                                               calibration folders): pairs,
                                               thresholds, open-set rows
  own_data.evaluate_pairs_file                 your own pairs files

`runner.evaluate_checkpoint` runs the ones a config names on a workdir's
model and stores the results that decisions read.

The metric functions (`verification_metrics`, `tinyface_metrics`,
`scface_metrics`, `ijb_metrics`, ...) work on embeddings alone;
`extract.extract_embeddings` does batching and flip fusion; `report` prints
and stores results.
"""
