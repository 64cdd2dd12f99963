"""npt-ds: DeepSpeed training of NPT (Neuro-Plastic Transformer) Llama models."""

__version__ = "0.1.0"
