"""The shape of the code, checked: the import graph runs one way, the CLIs start without torch, every
module is listed in the README's Layout section, and no library file outgrows one concept."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = sorted((ROOT / "d4k_jax").rglob("*.py"))
MAX_LINES = 400


def _imports(file: Path) -> list[str]:
    """Every module `file` imports, at the top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_the_library_never_imports_conversion_or_torch():
    bad = [
        f"{f.relative_to(ROOT)}: {name}"
        for f in LIBRARY
        for name in _imports(f)
        if name.split(".")[0] in ("conversion", "torch", "diffusers", "tools")
    ]
    assert not bad, bad


def test_the_clis_import_no_torch():
    code = (
        "import sys; import d4k_jax.train, d4k_jax.sample, d4k_jax.evaluate, d4k_jax.reconstruct; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'conversion')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_library_files_stay_short():
    long = {str(f.relative_to(ROOT)): n for f in LIBRARY if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def _listed(tree: str) -> set[str]:
    """The files a layout tree names: `root/` at the left margin, then indented `sub/a.py, b.py` (b.py in sub/)."""
    listed, root = set(), ""
    for line in tree.splitlines():
        names = line.split("  ")[0] if line.startswith(" ") else line.split()[0] if line.strip() else ""
        if not line.startswith(" "):
            root = names if names.endswith("/") else ""
            continue
        folder = ""
        for name in re.findall(r"[\w/]+\.py", line.strip().split("   ")[0]):
            folder = name.rpartition("/")[0] + "/" if "/" in name else folder
            listed.add(root + (name if "/" in name else folder + name))
    return listed


def test_every_module_has_a_docstring_and_a_line_in_the_readme_layout():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    modules = [f for f in [*LIBRARY, *sorted((ROOT / "conversion").glob("*.py"))] if f.name != "__init__.py"]
    undocumented = [str(f.relative_to(ROOT)) for f in modules if not ast.get_docstring(ast.parse(f.read_text()))]
    listed = _listed(layout[layout.index("```") : layout.index("```", layout.index("```") + 3)])
    unlisted = [str(f.relative_to(ROOT)) for f in modules if str(f.relative_to(ROOT)) not in listed]
    assert not undocumented, f"no opening docstring: {undocumented}"
    assert not unlisted, f"not in the README's Layout section: {unlisted}"
    stale = sorted(p for p in listed if not (ROOT / p).is_file())
    assert not stale, f"the README's Layout section names files that do not exist: {stale}"


def test_long_functions_say_why():
    """A function over 60 lines has a comment right above it (or above its decorators) saying why."""
    unexplained = []
    for f in LIBRARY:
        lines = f.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 60:
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if not lines[first - 2].lstrip().startswith("#"):
                    unexplained.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not unexplained, unexplained
