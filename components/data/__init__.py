"""Data: reading images and masks, dataset layouts and manifests, transforms, pseudo-anomaly synthesis,
the embedded synthetic dataset, downloads and caches (pure Python/numpy/PyTorch)."""
