"""squeeze: smaller GGUF models by layer-wise quantization and layer pruning."""

__version__ = "0.1.0"
