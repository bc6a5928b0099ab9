"""One-way layering: `leanvae_kernels` is the op library and knows nothing of the model; everything that
knows the model's modules lives in `leanvae/` (leanvae/fused/). No module under leanvae_kernels/ may import
`leanvae`, absolutely or through a relative import that climbs out of the package."""
import ast
import pathlib

import pytest
from helpers import ROOT as REPO_ROOT

ROOT = pathlib.Path(REPO_ROOT)
PKG = ROOT / "leanvae_kernels"


def _imports(path, text=None):
    """(line, absolute module name) of every import in the file, relative ones resolved; a relative import
    that climbs above the top-level package is reported as '<above top level>'."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    package = list(path.relative_to(ROOT).parts[:-1])  # the package the module belongs to
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                if node.level - 1 >= len(package):
                    out.append((node.lineno, "<above top level>"))
                    continue
                mod = ".".join(package[: len(package) - (node.level - 1)] + ([mod] if mod else []))
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}" if mod else alias.name) for alias in node.names]
    return out


SOURCES = sorted(PKG.rglob("*.py"))


def test_sources_found():
    assert len(SOURCES) >= 8, SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_op_library_does_not_import_the_model(path):
    bad = [(line, mod) for line, mod in _imports(path)
           if mod == "leanvae" or mod.startswith("leanvae.") or mod.startswith("<")]
    assert not bad, f"{path.relative_to(ROOT)} imports the model package: {bad}"


def test_checker_catches_a_model_import():
    src = "import torch\nfrom leanvae.modules import PEG3D\nfrom ... import leanvae\nfrom .. import _backend\n"
    mods = [m for _, m in _imports(PKG / "ops" / "probe.py", text=src)]
    assert "leanvae.modules" in mods and "<above top level>" in mods and "leanvae_kernels._backend" in mods
