"""D2SD: Dual-Diffuse Speculative Decoding. See README.md and ARCHITECTURE.md."""

__all__: list[str] = []
