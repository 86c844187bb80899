"""The layout of experiments/: one package per experiment, with the files
`python -m experiments.NAME` needs; the shared plumbing in experiments/common
imports no experiment, and no experiment imports another. Imports are read
with `ast`, anywhere in a module (inside functions too), so that an import
made late to keep TensorFlow out of the start counts as well."""

import ast
from pathlib import Path

import pytest

from tests.experiments.helpers import EXPERIMENTS, EXPERIMENTS_DIR, ROOT

KNOWN = {
    "mnist_mlp",
    "population_study",
    "lr_sweep",
    "lenet_bn",
    "sequential_mnist",
    "perils",
    "shift",
}
REQUIRED = ("__init__.py", "__main__.py", "main.py", "config.py", "configs/smoke.toml")
TESTS_DIR = ROOT / "tests" / "experiments"
# What a test module of the experiments may import from tests/: the shared
# helpers and the NumPy references, never another test module.
TEST_IMPORTS = {"tests", "tests.reference", "tests.experiments.helpers"}


def module_name(path, root=ROOT):
    """`experiments.lenet_bn.main` for experiments/lenet_bn/main.py."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, root=ROOT):
    """The absolute names of the modules `path` imports; `from X import y`
    counts as importing `X` and `X.y` (y may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            modules.add(base)
            modules |= {f"{base}.{alias.name}" for alias in node.names}
    return modules


def experiment_of(module):
    """The package under experiments. that `module` belongs to, or None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "experiments" and len(parts) > 1 else None


def modules_of(folder):
    return sorted(Path(folder).rglob("*.py"))


def test_every_experiment_is_found():
    assert set(EXPERIMENTS) >= KNOWN
    assert "common" not in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_has_its_entry_point_config_and_smoke_config(name):
    for required in REQUIRED:
        assert (EXPERIMENTS_DIR / name / required).is_file(), f"{name}/{required}"


def test_no_module_outside_the_packages():
    assert sorted(p.name for p in EXPERIMENTS_DIR.glob("*.py")) == ["__init__.py"]
    packages = {p.parent.name for p in EXPERIMENTS_DIR.glob("*/__init__.py")}
    folders = {
        p.name
        for p in EXPERIMENTS_DIR.iterdir()
        if p.is_dir() and p.name != "__pycache__"
    }
    assert folders == packages == {*EXPERIMENTS, "common"}


def test_common_imports_no_experiment():
    bad = {
        module_name(path): sorted(
            m
            for m in imported_modules(path)
            if experiment_of(m) not in (None, "common")
        )
        for path in modules_of(EXPERIMENTS_DIR / "common")
    }
    assert {k: v for k, v in bad.items() if v} == {}
    assert imported_modules(EXPERIMENTS_DIR / "__init__.py") == {"os"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_no_experiment_imports_another(name):
    allowed = {None, "common", name}
    bad = {
        module_name(path): sorted(
            m for m in imported_modules(path) if experiment_of(m) not in allowed
        )
        for path in modules_of(EXPERIMENTS_DIR / name)
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "experiments" / "lenet_bn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import main\n")
    path = package / "main.py"
    path.write_text(
        "import numpy as np\n"
        "from experiments import lr_sweep\n"
        "from .models import build\n"
        "from .. import common\n"
        "def run():\n"
        "    from experiments.mnist_mlp.stacked import product\n"
        "    import experiments.population_study.main\n"
    )
    assert imported_modules(path, tmp_path) == {
        "numpy",
        "experiments",
        "experiments.lr_sweep",
        "experiments.lenet_bn.models",
        "experiments.lenet_bn.models.build",
        "experiments.common",
        "experiments.mnist_mlp.stacked",
        "experiments.mnist_mlp.stacked.product",
        "experiments.population_study.main",
    }
    assert imported_modules(package / "__init__.py", tmp_path) == {
        "experiments.lenet_bn",
        "experiments.lenet_bn.main",
    }
    assert {experiment_of(m) for m in imported_modules(path, tmp_path)} == {
        None,
        "lr_sweep",
        "lenet_bn",
        "common",
        "mnist_mlp",
        "population_study",
    }


def test_no_test_module_imports_another():
    bad = {}
    for path in modules_of(TESTS_DIR):
        tests = {m for m in imported_modules(path) if m.split(".")[0] == "tests"}
        # `from tests.reference import x` also names `tests.reference.x`.
        unexpected = sorted(
            m
            for m in tests
            if m not in TEST_IMPORTS
            and m.rpartition(".")[0] not in TEST_IMPORTS - {"tests"}
        )
        if unexpected:
            bad[module_name(path)] = unexpected
    assert bad == {}
