"""Losses: margin classification heads and the contrastive loss."""
