"""Recipe: the validated description of a fine-tuning job (schema, loading, overrides, error messages).

Imports pydantic and yaml only, so ``ftune validate`` never pays for torch.
"""

from ftune.recipe.loader import apply_overrides, load_recipe, validate_recipe
from ftune.recipe.methods import METHOD_CLASSES, method_class, method_names
from ftune.recipe.schema import Recipe

__all__ = ["METHOD_CLASSES", "Recipe", "apply_overrides", "load_recipe", "method_class", "method_names", "validate_recipe"]
