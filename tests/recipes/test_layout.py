"""The package ships the product, the recipes live beside it: nothing in src/idefics3 imports `recipes`, and the
packaged demo model holds only the files a recipe's install copies."""

from __future__ import annotations

import ast
from pathlib import Path

from recipes.demo.recipe import MODEL_FILES

import idefics3

SRC = Path(__file__).resolve().parents[2] / "src" / "idefics3"


def test_the_package_never_imports_the_recipes():
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n == "recipes" or n.startswith("recipes.") for n in names), path


def test_packaged_demo_model_holds_only_installed_files():
    folder = idefics3.DEMO_MODEL
    if not (folder / "config.json").is_file():
        return  # a checkout without the built-in model
    assert {p.name for p in folder.iterdir()} <= set(MODEL_FILES)
