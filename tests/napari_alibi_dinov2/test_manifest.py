"""The npe2 manifest: valid, named as the distribution (npe2 refuses a plugin whose manifest name differs from its
package's), found through setup.py's entry point, and every command it names importable."""

import ast
import importlib
import importlib.util

from npe2 import PluginManifest

from conftest import NAPARI_MANIFEST, REPO_ROOT


def setup_keywords() -> dict:
    tree = ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return {keyword.arg: keyword.value for keyword in call.keywords}


def test_the_manifest_is_named_as_the_distribution_and_its_entry_point_finds_it():
    manifest = PluginManifest.from_file(NAPARI_MANIFEST)
    keywords = setup_keywords()
    assert manifest.name == ast.literal_eval(keywords["name"])
    entry_points = {ast.literal_eval(key): value for key, value in zip(keywords["entry_points"].keys,
                                                                       keywords["entry_points"].values)}
    assert ast.literal_eval(entry_points["napari.manifest"]) == [f"{manifest.name} = napari_alibi_dinov2:napari.yaml"]
    package_data = ast.literal_eval(keywords["package_data"])
    assert package_data == {"napari_alibi_dinov2": ["napari.yaml"]}


def test_every_command_of_the_manifest_imports():
    manifest = PluginManifest.from_file(NAPARI_MANIFEST)
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        if module.endswith(".convpaint") and importlib.util.find_spec("napari_convpaint") is None:
            continue  # Convpaint is optional
        assert callable(getattr(importlib.import_module(module), name)), command.id
    assert {widget.display_name for widget in manifest.contributions.widgets} == {
        "Scribble segmentation", "Convpaint with ALiBi models"
    }
