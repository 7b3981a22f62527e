"""The documentation stays true: its commands run, its generated reference is current, its module
table matches the tree, and its links and paths exist.

Shell blocks: a ```bash block of README.md or docs/serving.md whose fence follows a line
``<!-- doc-test -->`` runs verbatim, in order, in one temporary directory with a fresh ``HOME``
(README's blocks, then serving.md's, which continue its walk-through). The quick start's block
(``<!-- doc-test: quick-start -->``) is checked but not run: its ``pip install`` is the
environment these tests run in, and its ``fbnet train`` (14 minutes) is replaced by a link from
``runs/synth-seed0`` to the ``trained`` fixture's run (a tiny model trained through the same CLI).
Each block runs in its own process group, which is killed afterwards, so a server it started
never outlives it.
"""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fbnet": "fbnet", "export": "fbnet.export", "runtime": "fbnet.runtime"}
QUICK_START = 'pip install -c constraints.txt -e ".[dev]" && fbnet train'
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_blocks(path: Path) -> list[tuple[str, str]]:
    """``(marker, text)`` of every ```bash block announced by a ``<!-- doc-test... -->`` line."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- doc-test(?:: ([\w-]+))? -->", line.strip())
        if not m:
            continue
        assert lines[i + 1].strip() == "```bash", f"{path.name}:{i + 1}: a doc-test marker must precede a ```bash fence"
        end = lines.index("```", i + 2)
        blocks.append((m.group(1) or "run", "\n".join(lines[i + 2:end])))
    return blocks


def _run_block(text: str, cwd: Path, env: dict, timeout: float = 900) -> str:
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # whatever the block left running (a server)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
    assert proc.returncode == 0, f"exit {proc.returncode}:\n$ {text}\n{out[-4000:]}"
    return out


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def new_user(trained, tmp_path_factory):
    """A working directory and a fresh home, as a new user has, with the quick start's run in place."""
    if not _port_free(8080):
        pytest.skip("port 8080, which the documented server uses, is busy on this host")
    root = tmp_path_factory.mktemp("new_user")
    (root / "home").mkdir()
    work = root / "clone"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "synth-seed0").symlink_to(trained / "run", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "PYTEST_"))}
    env.update(HOME=str(root / "home"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return work, env


def test_readme_walkthrough_runs_as_written(new_user):
    work, env = new_user
    blocks = doc_blocks(ROOT / "README.md")
    assert blocks[0] == ("quick-start", QUICK_START), "the quick start changed: update tests/test_docs.py"
    runs = [text for kind, text in blocks[1:] if kind == "run"]
    assert len(runs) == len(blocks) - 1 and len(runs) >= 2
    outputs = [_run_block(text, work, env) for text in runs]
    assert (work / "runs" / "synth-seed0" / "bundle" / "manifest.json").is_file()
    assert (work / "runs" / "gallery" / "gallery.json").is_file()
    served = outputs[-1]
    assert '"ready"' in served and served.count('"hits"') >= 2, served


def test_serving_doc_commands_run_as_written(new_user):
    work, env = new_user
    if not (work / "runs" / "gallery").is_dir():
        pytest.skip("needs the README's walk-through (test_readme_walkthrough_runs_as_written)")
    blocks = doc_blocks(ROOT / "docs" / "serving.md")
    assert blocks and all(kind == "run" for kind, _ in blocks)
    for _, text in blocks:
        _run_block(text, work, env)
    assert (work / "runs" / "synth-seed0" / "bundle-int8" / "manifest.json").is_file()


def test_training_doc_commands_run_as_written(tmp_path):
    """docs/training.md's torchrun example, pasted into a fresh directory with a fresh HOME."""
    blocks = doc_blocks(ROOT / "docs" / "training.md")
    assert blocks and all(kind == "run" for kind, _ in blocks) and "torchrun" in blocks[-1][1]
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "PYTEST_"))}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1")
    out = "".join(_run_block(text, tmp_path, env) for _, text in blocks)
    assert out.count("checkpoint: runs/small-ddp/best.pt") == 1, out[-3000:]
    assert (tmp_path / "runs" / "small-ddp" / "metrics-test.json").is_file()


def test_quick_start_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet --progress-bar off -c constraints.txt -e ".[dev]"' in ci
    assert re.search(r"^python3 -m pytest$", ci, re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert "```bash\npython3 -m pytest\n```" in readme and 'python3 -m pytest -m "not slow"' in readme


def test_readme_fits_on_a_screen_or_two():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def _config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_config():
    ref = _config_reference()
    assert (ROOT / "docs" / "configuration.md").read_text() == ref.render(), \
        "docs/configuration.md is stale: run python docs/config_reference.py"
    rows = ref.fields()
    assert all(meaning for *_, meaning in rows), [r[:2] for r in rows if not r[-1]]


def _modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")
            if p.name != "__init__.py"}


def test_architecture_doc_matches_the_tree():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:fbnet|export|runtime)/[\w/]+\.(?:py|html))`", text))
    missing = _modules() - named
    assert not missing, f"docs/architecture.md does not name {sorted(missing)}"
    gone = {p for p in named if not (ROOT / p).exists()}
    assert not gone, f"docs/architecture.md names files that do not exist: {sorted(gone)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_paths_and_links_exist(doc):
    text = doc.read_text()
    for bad in ("fbnet/runtime/", "fbnet/export/"):
        assert bad not in text, f"{doc.name}: write folder paths ({bad} is {bad.split('/')[1]}/)"
    for path in re.findall(r"`((?:fbnet|export|runtime|tests|benchmarks|configs|docs)/[\w./-]+\.\w+)`", text):
        assert (ROOT / path).exists(), f"{doc.name}: {path} does not exist"
    for link in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text):
        if not link.startswith(("http:", "https:", "mailto:")):
            assert (doc.parent / link).exists(), f"{doc.name}: link to {link} does not exist"
