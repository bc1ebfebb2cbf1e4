"""The project's layers (README, "Layout"): every import, at any depth (lazy imports included), points to the same
layer or one below, and no group of modules imports itself in a circle."""

import ast
from pathlib import Path

import pytest

from alibi_dinov2.commands import COMMANDS
from conftest import REPO_ROOT


ROOT = REPO_ROOT
REMOTE_CODE = ("alibi_attention", "configuration_alibi_dinov2", "configuration_alibi_dinov3", "modeling_alibi_dinov2",
               "modeling_alibi_dinov3")
SCRIPTS = ("convert_checkpoint", "train_distill", "quickstart", "benchmarks")
# Bottom to top. Inside the library: its subpackages, bottom to top.
# The user interfaces, the browser demo and the napari plugin, stand side by side: neither imports the other.
LAYERS = (REMOTE_CODE, ("alibi_dinov2",), ("evaluation",), ("demo", "napari_alibi_dinov2"), SCRIPTS,
          ("alibi_dinov2.commands",))
LIBRARY = (
    ("alibi_dinov2.errors", "alibi_dinov2.names", "alibi_dinov2.synthetic"),
    ("alibi_dinov2.io",),
    ("alibi_dinov2.cli",),
    ("alibi_dinov2.features",),
    ("alibi_dinov2.hub",),
    ("alibi_dinov2.segmentation", "alibi_dinov2.conversion"),
    ("alibi_dinov2.training",),
    ("alibi_dinov2.commands",),
)


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "build") or relative.parts[0].startswith(".") or relative.name == "setup.py":
            continue
        if ".egg-info" in str(relative) or "site-packages" in relative.parts:
            continue
        name = ".".join(relative.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, modules) -> set[str]:
    """The project modules `name` imports (`from a import b` counts `a.b` when that is a module, else `a`)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            candidates = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        found |= {candidate for candidate in candidates if candidate in modules and candidate != name}
    if name == "alibi_dinov2.commands":  # the console commands, imported by name when run
        found |= {module for module in COMMANDS.values() if module in modules}
    return found


def rank(name: str, layers) -> int | None:
    """The index of the highest layer holding `name` (`alibi_dinov2.commands` is in the library and above it)."""
    held = [index for index, layer in enumerate(layers)
            if any(name == prefix or name.startswith(prefix + ".") for prefix in layer)]
    return max(held, default=None)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert [name for name in graph if rank(name, LAYERS) is None] == []
    library = [name for name in graph if name.startswith("alibi_dinov2.")]
    assert [name for name in library if rank(name, LIBRARY) is None] == []


def test_imports_point_only_downward(graph):
    upward = []
    for name, imported in graph.items():
        for target in imported:
            if rank(target, LAYERS) > rank(name, LAYERS):
                upward.append(f"{name} -> {target}")
            elif name.startswith("alibi_dinov2.") and target.startswith("alibi_dinov2."):
                if rank(target, LIBRARY) > rank(name, LIBRARY):
                    upward.append(f"{name} -> {target}")
    assert sorted(upward) == []


UI_TOOLKITS = ("napari", "napari_convpaint", "magicgui", "qtpy", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports absolutely (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_napari_plugin_imports_napari_or_qt():
    toolkit_users = sorted(name for name, path in project_modules().items()
                           if third_party_imports(path) & set(UI_TOOLKITS))
    assert toolkit_users and all(name.startswith("napari_alibi_dinov2") for name in toolkit_users), toolkit_users


def test_the_two_user_interfaces_do_not_import_each_other(graph):
    crossing = [f"{name} -> {target}" for name, imported in graph.items() for target in imported
                if {name.split(".")[0], target.split(".")[0]} == {"demo", "napari_alibi_dinov2"}]
    assert crossing == []
    assert rank("napari_alibi_dinov2.widget", LAYERS) == rank("demo.segmentation_view", LAYERS)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name):
        state[name] = 1
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None


def test_the_walk_sees_cycles_and_upward_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert rank("evaluation.report", LAYERS) > rank("alibi_dinov2.io.images", LAYERS)
    assert rank("alibi_dinov2.hub.models", LIBRARY) > rank("alibi_dinov2.features.preprocessing", LIBRARY)
    modules = project_modules()
    lazy = imported_modules("alibi_dinov2.hub.models", modules["alibi_dinov2.hub.models"], modules)
    assert "alibi_dinov2.features.preprocessing" in lazy and "alibi_dinov2.hub.sources" in lazy
