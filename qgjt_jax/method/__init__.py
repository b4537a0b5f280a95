"""QGFace, one home per concept: settings, quality, heads, the contrastive
loss, queues, the encoder and the batch (docs/METHOD.md)."""
