"""Every module of the three packages imports, in the fast tier (``pytest -m "not slow"``).

The modules are found on disk (``fbnet/`` is ``fbnet``, ``export/`` is ``fbnet.export``,
``runtime/`` is ``fbnet.runtime``), so a new module is covered without a line here. A module
that cannot be imported without an optional package (Ray, PyTriton, TensorRT, ...) is skipped with
the package's name; every other import error fails.
"""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fbnet": "fbnet", "export": "fbnet.export", "runtime": "fbnet.runtime"}
#: Packages of the optional extras (pyproject.toml): a module may need one of them to import.
OPTIONAL = {"ray", "pytriton", "tensorrt", "tritonclient", "faiss", "tensorboard", "cv2", "sklearn", "uvloop",
            "httptools"}


def module_names() -> list[str]:
    names = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return names


def test_every_package_folder_is_found():
    names = module_names()
    assert {"fbnet.train", "fbnet.export.bundle", "fbnet.runtime.search.searcher"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", module_names())
def test_module_imports(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs the optional package {exc.name}")
        raise
