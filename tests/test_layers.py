"""The shape of the house: imports only go down the floors of README's Architecture section, and no module
imports itself back through others.

Every module under imm/ and hydra_plugins/ is read with ast (imports inside functions too, as they run all
the same) and placed on the floor of its longest matching name below; a module that matches none fails, so a
new module is placed on purpose. The same floors are written in the README, and the README's block must say
what this list says.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# floor -> the modules (or packages: every module under them) that live there; a lower floor never imports a
# higher one
FLOORS = {
    0: ["imm", "imm.errors", "imm.diskspace", "imm.runs", "imm.ranges", "imm.core", "imm.nets", "imm.data",
        "imm.metrics", "imm.official"],
    1: ["imm.tracking", "imm.training.checkpoint", "imm.training.distributed", "imm.training.signals",
        "imm.training.threads"],
    2: ["imm.config"],
    3: ["imm.factory"],
    4: ["imm.validation"],
    5: ["imm.evaluation"],
    6: ["imm.training", "imm.tasks", "imm.report"],
    7: ["imm.launch"],
    8: ["imm.cli", "imm.__main__", "hydra_plugins"],
}  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for path in [*(ROOT / "imm").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def floor_of(module: str) -> int | None:
    best, floor = "", None
    for level, names in FLOORS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, floor = name, level
    return floor


def imports(path: Path, known: dict) -> set[str]:
    """The project modules `path` imports (a name imported from a package is the submodule when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    out = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in modules() if floor_of(m) is None)
    assert not unplaced, f"place these modules on a floor (FLOORS here and README's Architecture): {unplaced}"


def test_imports_only_go_down():
    upward = [
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, deps in sorted(graph().items())
        for b in sorted(deps)
        if floor_of(a) is not None and floor_of(b) is not None and floor_of(b) > floor_of(a)
    ]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    g = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_the_readme_shows_the_same_floors():
    block = README_BLOCK.search((ROOT / "README.md").read_text())
    assert block, "README's Architecture section has no floors block"
    shown = {}
    for line in block.group(1).splitlines():
        if m := re.match(r"^\s*(\d+)\s+\S+\s+(.*?)\s*(?:#.*)?$", line):
            shown[int(m.group(1))] = m.group(2).replace(",", " ").split()
    assert shown == FLOORS


def test_the_check_sees_an_upward_import(tmp_path):
    """The reader finds imports inside functions, and resolves a submodule imported from its package."""
    known = {"imm.config": None, "imm.validation": None, "imm.data": None, "imm.data.latents": None}
    path = tmp_path / "m.py"
    path.write_text("from imm.data import latents\n\ndef f():\n    from imm.validation import validate\n")
    assert imports(path, known) == {"imm.data.latents", "imm.validation"}
    assert floor_of("imm.validation") > floor_of("imm.config")


README_BLOCK = re.compile(r"```\nfloor.*?\n(.*?)```", re.S)
