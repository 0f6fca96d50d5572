"""The package layers: each part of ``workbench`` imports only from the layers below it.

    config, util -> fp8 -> model -> io -> data, tasks -> train -> rl -> vertical -> serve -> analysis -> viz -> cli

Data flows one way: model parts know nothing of checkpoints, training knows nothing of RL, analysis and
viz read models and logs but never reach back into training. Every import counts, including the ones
inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "workbench"

LAYERS: list[set[str]] = [
    {"config", "util", "atomic"},
    {"fp8"},
    {"model"},
    {"io"},
    {"data", "tasks"},
    {"dist"},
    {"train"},
    {"rl"},
    {"vertical"},
    {"serve"},
    {"analysis"},
    {"viz"},
    {"cli"},
    {"__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
# inside one layer, which parts may import which (the rest of a layer is independent)
SAME_LAYER = {("tasks", "data"), ("config", "atomic"), ("config", "util"), ("util", "atomic")}


def part_of(module: str) -> str | None:
    """``workbench.io.hf`` -> ``io``; ``workbench`` itself (the package's re-exports) -> None."""
    bits = module.split(".")
    if bits[0] != "workbench" or len(bits) == 1:
        return None
    return bits[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "workbench":  # from workbench import hf, fp8, ...
                found += [(node.lineno, f"workbench.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "workbench"]


def modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


def test_every_part_has_a_layer():
    parts = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in modules()}
    assert parts <= set(RANK), f"parts without a layer: {sorted(parts - set(RANK))}; add them to LAYERS"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    here = path.relative_to(ROOT).parts[0].removesuffix(".py")
    bad = []
    for line, name in imports_of(path):
        there = part_of(name)
        if there is None:
            if name == "workbench":
                bad.append(f"line {line}: imports the package root; import the module that holds the name")
            continue
        if there == here or (here, there) in SAME_LAYER:
            continue
        if RANK[there] >= RANK[here]:
            bad.append(f"line {line}: {name} ({there}, layer {RANK[there]}) from {here} (layer {RANK[here]})")
    assert not bad, f"{path.relative_to(ROOT)} imports upward:\n" + "\n".join(bad)


def test_the_check_can_fail(tmp_path):
    """The walk sees imports inside functions too."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from workbench.rl.grpo import grpo_train\n")
    assert imports_of(f) == [(2, "workbench.rl.grpo")]
