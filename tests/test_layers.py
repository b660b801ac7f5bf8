"""How the package is layered: which module may import which, no import cycle, and no import-time side effects.

The graph is read from the source (every ``import`` statement, at module level or inside a function), so a
cycle hidden behind a lazy import or ``TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fpt"
HEAVY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "tensorboard", "safetensors", "numpy", "PIL")


def module_name(path: Path) -> str:
    parts = ("fpt", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The fpt modules that module ``name`` imports (``from fpt.x import y`` counts as fpt.x.y if that is a
    module, else as fpt.x)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fpt"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fpt":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found - {name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_the_graph_covers_the_package() -> None:
    assert {"fpt.config", "fpt.cache", "fpt.preload", "fpt.run", "fpt.train", "fpt.evaluate", "fpt.cli"} <= set(GRAPH)
    assert all(target in MODULES for targets in GRAPH.values() for target in targets)


def test_there_is_no_import_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


def depends_on(name: str) -> set[str]:
    """Every fpt module that ``name`` imports, directly or not."""
    seen: set[str] = set()
    stack = [name]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("fpt.config", {"fpt.errors"}),  # the bottom layer: models import config, never the reverse
        ("fpt.quantization", set()),  # the int8 codec: torch only, read by the cache and the fusion module
        ("fpt.cache", {"fpt.config", "fpt.errors", "fpt.runtime", "fpt.quantization"}),  # storage: no models or data
        (
            "fpt.data.loaders",
            {
                "fpt.config",
                "fpt.errors",
                "fpt.runtime",
                "fpt.data.datasets",
                "fpt.data.images",
                "fpt.data.dicom",
                "fpt.distributed",
            },
        ),  # the ranks a training loader shares its batches among
    ],
)
def test_low_layers_import_only_what_is_below_them(module: str, allowed: set[str]) -> None:
    assert depends_on(module) - {"fpt.data.transforms", "fpt.data"} <= allowed


def test_models_never_import_the_pipeline_above_them() -> None:
    pipeline = {"fpt.train", "fpt.run", "fpt.evaluate", "fpt.preload", "fpt.cache", "fpt.task", "fpt.cli", "fpt.demo"}
    for name in MODULES:
        if name.startswith("fpt.models"):
            assert not depends_on(name) & pipeline, name


def test_the_package_root_and_the_command_line_parser_import_nothing_heavy() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import fpt\n"
        "from fpt.cli import build_parser\n"
        "parser = build_parser()\n"
        "commands = ['info', 'preload', 'train', 'evaluate', 'predict', 'synth', 'demo', 'bench']\n"
        "for argv in [['--help'], *([c, '--help'] for c in commands), ['bench', 'memory', '--help'],\n"
        "             ['bench', 'accuracy', '--help']]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        parser.parse_args(argv)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_importing_every_module_changes_no_global_state() -> None:
    """(``fpt.__main__`` is left out: it runs the command line, as ``python -m fpt`` should.)"""
    code = (
        "import importlib, logging, matplotlib, torch\n"
        "matplotlib.use('svg')\n"
        "levels = {name: logging.getLogger(name).level for name in ('torch.profiler', 'torch', 'matplotlib')}\n"
        f"for name in {sorted(set(MODULES) - {'fpt.__main__'})!r}:\n"
        "    importlib.import_module(name)\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert levels == {name: logging.getLogger(name).level for name in levels}\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
