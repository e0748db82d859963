"""Scoring: anomaly maps, batched inference, decisions, the model package, overlays and export."""
