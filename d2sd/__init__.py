"""D2SD: Dual-Diffuse Speculative Decoding. See README.md and ARCHITECTURE.md.

`python -m d2sd.run` (d2sd/run.py) shows the whole flow: load a TargetModel and two
DFlashDrafters, build a Decoder, call `generate(prompt_ids, GenerationConfig(...))`.
"""

from d2sd.errors import D2SDError
from d2sd.generate import Decoder, GenerationConfig, GenerationResult
from d2sd.models import DFlashDrafter, TargetModel

__all__ = [
    "D2SDError",
    "DFlashDrafter",
    "Decoder",
    "GenerationConfig",
    "GenerationResult",
    "TargetModel",
]
