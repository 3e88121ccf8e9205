"""tunesmith: fine-tune open language models on your own data and prove what the fine-tune bought."""

from tunesmith.errors import DataError, ModelError, RecipeError, RunError, TunesmithError

__version__ = "0.1.0"

__all__ = ["DataError", "ModelError", "RecipeError", "RunError", "TunesmithError", "__version__"]
