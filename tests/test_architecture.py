"""The import graph of ``src/attnkit``: data flows one way, module -> op -> backend/kernel.

``docs/architecture.md`` ("Data flow") states the rules; this file reads every source file with
``ast`` (nothing is imported or executed) and checks them:

* a file in ``mechanisms/`` imports from attnkit only ``ops`` (public names, never ``ops.base`` nor
  a backend module), ``masks``, ``registry``, ``reference`` and ``_validate``; never ``kernels`` nor
  another mechanism; and defines no op (no top-level function taking ``q, k, v``);
* ``reference/`` imports only torch, the standard library and other ``attnkit.reference`` modules;
* ``kernels/`` never imports ``ops`` or ``mechanisms``;
* ``masks/`` never imports ``ops``, ``kernels`` or ``mechanisms``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import attnkit

PKG = Path(attnkit.__file__).resolve().parent
ROOT = PKG.parent  # the directory holding the ``attnkit`` package

# modules under attnkit.ops that are backends or their internals, not op entry points
BACKEND_MODULES = frozenset({"base", "sdpa", "flex", "blocked", "gather", "tiled", "tiles", "natten", "chunk",
                             "recurrent", "reference"})
# what a mechanism may import from attnkit (``_validate``: constructor arguments use its int_arg)
MECHANISM_MAY_IMPORT = ("attnkit.ops", "attnkit.masks", "attnkit.registry", "attnkit.reference", "attnkit._validate")


@dataclass(frozen=True)
class Import:
    """One imported thing: ``module`` (resolved, absolute) and, for ``from m import n`` where ``n``
    is not a submodule, the attribute ``name``."""

    file: str
    line: int
    module: str
    name: str | None

    def __str__(self) -> str:
        what = self.module if self.name is None else f"{self.module}.{self.name}"
        return f"{self.file}:{self.line} imports {what}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports_of(path: Path) -> list[Import]:
    """Every import statement of a file, at any depth (lazy imports inside functions count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this package
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                if _under(module, "attnkit") and _is_module(sub):
                    out.append(Import(rel, node.lineno, sub, None))
                else:
                    out.append(Import(rel, node.lineno, module, a.name))
    return out


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def _mechanism_files() -> list[Path]:
    # the package's __init__ imports every mechanism on purpose (registration), so it is not a mechanism
    return [p for p in _files("mechanisms") if p.name != "__init__.py"]


def mechanism_import_violations() -> list[str]:
    bad = []
    for path in _mechanism_files():
        me = _module_name(path)
        for imp in imports_of(path):
            m = imp.module
            if not _under(m, "attnkit"):
                continue
            if _under(m, "attnkit.kernels"):
                bad.append(f"{imp}: a mechanism never imports kernels/")
            elif _under(m, "attnkit.mechanisms"):
                if m != me:
                    bad.append(f"{imp}: a mechanism never imports another mechanism")
            elif _under(m, "attnkit.ops"):
                inner = m.split(".")[2:]  # attnkit.ops.<family>.<module>...
                if any(part in BACKEND_MODULES for part in inner):
                    bad.append(f"{imp}: {m} is ops plumbing or a backend, not an op entry point")
                elif imp.name is not None and imp.name.startswith("_"):
                    bad.append(f"{imp}: {imp.name} is private to {m}")
            elif not any(_under(m, ok) for ok in MECHANISM_MAY_IMPORT):
                bad.append(f"{imp}: mechanisms import only {', '.join(MECHANISM_MAY_IMPORT)}")
    return bad


def ops_in_mechanisms() -> list[str]:
    bad = []
    for path in _mechanism_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = [a.arg for a in node.args.posonlyargs + node.args.args]
                if params[:3] == ["q", "k", "v"]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} defines {node.name}(q, k, v, ...): "
                               "ops live in ops/, not mechanisms/")
    return bad


def reference_import_violations() -> list[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for path in _files("reference"):
        for imp in imports_of(path):
            top = imp.module.split(".")[0]
            if top == "torch" or top in stdlib or _under(imp.module, "attnkit.reference"):
                continue
            bad.append(f"{imp}: reference/ imports only torch, the standard library and attnkit.reference")
    return bad


def forbidden_imports(sub: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{imp}: {sub}/ never imports {', '.join(forbidden)}"
            for path in _files(sub) for imp in imports_of(path)
            if any(_under(imp.module, f) for f in forbidden)]


def test_the_parser_resolves_imports():
    """Guard against a checker that passes because it sees nothing."""
    mha = [i for i in imports_of(PKG / "mechanisms" / "mha.py") if _under(i.module, "attnkit")]
    assert any(i.module == "attnkit.ops.dense.call" and i.name == "attention" for i in mha), mha
    ops_init = imports_of(PKG / "ops" / "__init__.py")
    assert {"attnkit.ops.dense", "attnkit.ops.linear", "attnkit.ops.neighborhood"} <= {i.module for i in ops_init}
    assert len(_mechanism_files()) >= 20 and _files("reference") and _files("kernels") and _files("masks")


def test_mechanisms_import_only_public_op_names():
    bad = mechanism_import_violations()
    assert not bad, "\n".join(bad)


def test_no_op_lives_in_mechanisms():
    bad = ops_in_mechanisms()
    assert not bad, "\n".join(bad)


def test_reference_imports_only_torch_and_stdlib():
    bad = reference_import_violations()
    assert not bad, "\n".join(bad)


def test_kernels_never_import_ops_or_mechanisms():
    bad = forbidden_imports("kernels", ("attnkit.ops", "attnkit.mechanisms"))
    assert not bad, "\n".join(bad)


def test_masks_never_import_ops_kernels_or_mechanisms():
    bad = forbidden_imports("masks", ("attnkit.ops", "attnkit.kernels", "attnkit.mechanisms"))
    assert not bad, "\n".join(bad)
