"""Train timm image classifiers on Cambricon MLU, CUDA or CPU through HuggingFace Accelerate."""

__version__ = "0.1.0"
