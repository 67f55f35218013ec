"""Recipes: per-family, per-target settings for every stage, in `<family>/<target>.yaml` files.

`load_recipe("llama/h100")` (a shipped recipe) or `load_recipe("my.yaml")` returns the validated Recipe
and the name to show in messages. The schema is in `llmx.recipes.schema`.
"""

from llmx.recipes.loader import find_recipe, load_recipe, shipped_recipes

__all__ = ["find_recipe", "load_recipe", "shipped_recipes"]
