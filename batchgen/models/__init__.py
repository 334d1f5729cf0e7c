"""Model definitions, the weight loader and the architecture registry."""
from batchgen.models.config import ModelConfig
from batchgen.models.loader import load_model, resolve_model_path

__all__ = ["ModelConfig", "load_model", "resolve_model_path"]
