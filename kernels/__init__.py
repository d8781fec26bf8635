"""D2SD Triton kernels, each with an fp32 torch reference (`<op>_ref`). See ARCHITECTURE.md.

The public API is what this module exports; model code reaches kernels only through it.
"""

__all__: list[str] = []
