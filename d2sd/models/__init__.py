"""Model layer of D2SD: target adapter (our layer loop over HF weights) and the DFlash drafter.

See ARCHITECTURE.md ("Models") for the contracts; each module's docstring for the math.
"""

from d2sd.models.cache import Cache
from d2sd.models.drafter import (
    DFlashConfig,
    DFlashDrafter,
    default_mask_token_id,
    default_target_layer_ids,
)
from d2sd.models.loading import (
    TargetSource,
    default_gguf_path,
    load_hf_target,
    load_target,
    resolve_target_source,
)
from d2sd.models.spec import FAMILIES, BlockSpec, ModelSpec
from d2sd.models.target import TargetModel

__all__ = [
    "FAMILIES",
    "BlockSpec",
    "Cache",
    "DFlashConfig",
    "DFlashDrafter",
    "ModelSpec",
    "TargetModel",
    "TargetSource",
    "default_gguf_path",
    "default_mask_token_id",
    "default_target_layer_ids",
    "load_hf_target",
    "load_target",
    "resolve_target_source",
]
