"""GPU speed switches of the training engine: TF32 matmuls and ``torch.compile`` with a fallback."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from components.model import InpFormer

logger = logging.getLogger(__name__)

__all__ = ["compile_with_fallback", "set_tf32"]


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and newer); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def compile_with_fallback(model: InpFormer) -> None:
    """``torch.compile`` the model's trainable forward (``forward_features``, which ``forward`` and
    ``forward_cached`` call); the first failure logs a warning and the model runs eagerly again."""
    eager = model.forward_features
    compiled = torch.compile(eager)
    ok = [True]

    def forward_features(*args: Any, **kwargs: Any) -> Any:
        if ok[0]:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # a backend or graph the compiler cannot handle here
                logger.warning("torch.compile failed (%s: %s); training continues eagerly.", type(err).__name__, err)
                ok[0] = False
        return eager(*args, **kwargs)

    model.forward_features = forward_features
