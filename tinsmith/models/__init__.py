"""Base-model catalog: names -> local Hugging Face folders (see catalog.py)."""

from tinsmith.models.catalog import ModelSpec, default_cache_dir, known_models, resolve_model_dir

__all__ = ["ModelSpec", "default_cache_dir", "known_models", "resolve_model_dir"]
