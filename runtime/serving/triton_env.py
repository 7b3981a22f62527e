"""The PyTriton environment: ``nvidia-pytriton`` needs numpy < 2 while the project uses numpy 2, so
Triton serving gets a virtual environment of its own, pinned by ``constraints-pytriton.txt``.

::

    fbnet-serve-cli triton-env [DIR]          # build (or reuse) it; prints its python
    DIR/bin/fbnet-serve-cli triton --bundle B --gallery G --http-port 8000

It holds this checkout of fbnet (editable, ``--no-deps``: no torch) and the ``pytriton`` extra.
Built once per checkout and constraints file (a stamp records both); an interrupted build is redone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

from fbnet.errors import FbnetError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: runtime/serving/triton_env.py
CONSTRAINTS = ROOT / "constraints-pytriton.txt"


class TritonEnvError(FbnetError, RuntimeError):
    """The environment cannot be built; the message says why."""


def default_dir() -> Path:
    """One environment per checkout (it holds that checkout's fbnet, installed editable)."""
    home = Path(os.environ.get("FBNET_HOME", Path.home() / ".cache" / "fbnet"))
    return home / f"pytriton-env-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]}"


def _requirements() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise TritonEnvError("building the PyTriton environment needs Python 3.11+ (tomllib)") from None
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file() or not CONSTRAINTS.is_file():
        raise TritonEnvError(f"{ROOT}: needs a source checkout of fbnet (pyproject.toml, {CONSTRAINTS.name})")
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["pytriton"]


def build(target: Path | None = None, log=print) -> Path:
    """Build (or reuse) the environment; return its python."""
    target = Path(target or default_dir())
    python = target / "bin" / "python"
    requirements = _requirements()
    stamp_value = hashlib.sha256(CONSTRAINTS.read_bytes() + "\n".join([str(ROOT), *requirements]).encode()).hexdigest()
    stamp = target / ".fbnet-stamp"
    if python.is_file() and stamp.is_file() and stamp.read_text() == stamp_value:
        return python
    log(f"building the PyTriton environment in {target} (about a minute)")
    stamp.unlink(missing_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
    for args in (["--no-deps", "-e", str(ROOT)], requirements):
        done = subprocess.run(pip + args, capture_output=True, text=True)
        if done.returncode:
            raise TritonEnvError(f"pip install {' '.join(args)} failed in {target}:\n{done.stderr[-2000:]}")
    stamp.write_text(stamp_value)
    return python


def main() -> None:
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))


if __name__ == "__main__":
    main()
