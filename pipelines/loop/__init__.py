"""The inspection loop: operating points, review queue, drift, retraining with a gated promotion."""
