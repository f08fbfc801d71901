"""Recipes: schema (frozen dataclasses), YAML with locations, validation, rule resolution."""
