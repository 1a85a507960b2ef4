"""What importing gradguard costs and how its modules depend on each other."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import ROOT, child_env
from loops import train

import gradguard

PACKAGE = ROOT / "gradguard"
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports gradguard from this checkout."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**child_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _module_name(path: Path) -> str:
    return "gradguard" if path.stem == "__init__" else f"gradguard.{path.stem}"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The gradguard modules ``node`` imports anywhere inside it, functions included.

    Imports under ``if TYPE_CHECKING:`` never run and are left out.
    """
    found: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                found |= _imported(other, modules)
            continue
        if isinstance(child, ast.Import):
            found |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom) and child.module:
            submodules = {f"{child.module}.{alias.name}" for alias in child.names}
            found |= (submodules & modules) or {child.module}
        found |= _imported(child, modules)
    return found & modules


def _import_graph() -> dict[str, set[str]]:
    """Each gradguard module and the gradguard modules it imports, at any time."""
    paths = sorted(PACKAGE.glob("*.py"))
    modules = {_module_name(p) for p in paths}
    trees = {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in paths}
    graph = {name: _imported(tree, modules) for name, tree in trees.items()}
    # _startup.py runs as a followed child's ``sitecustomize``, a module of its own:
    # what its functions import, that module imports. gradguard._startup, which the
    # package reads for ENV_VAR and say(), never runs them.
    startup = trees["gradguard._startup"]
    graph["sitecustomize"] = graph["gradguard._startup"]
    outside_functions = [n for n in startup.body if not isinstance(n, _DEFINITIONS)]
    graph["gradguard._startup"] = _imported(ast.Module(outside_functions, []), modules)
    # The package imports these by name at their first use (PEP 562), out of the AST's sight.
    graph["gradguard"] |= set(vars(gradguard)["_ON_USE"].values())
    for name, imported in graph.items():
        imported.discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_import_graph_sees_imports_inside_functions() -> None:
    """The graph the cycle check reads includes the imports a function makes when it runs."""
    graph = _import_graph()
    assert "gradguard._api" in graph["gradguard._session"]  # inside Session's methods only
    assert "gradguard._session" in graph["sitecustomize"]  # inside the startup hooks only
    assert "gradguard._session" not in graph["gradguard._guard"]


def test_no_import_cycle_among_gradguards_modules() -> None:
    """No gradguard module imports, directly or through others, a module that imports it."""
    assert _cycles(_import_graph()) == []


def test_importing_gradguard_does_not_import_torch() -> None:
    """`import gradguard`, its errors, `Finding` and `CATALOGUE` leave torch and IPython out."""
    proc = _python(
        "import sys, gradguard\n"
        "assert gradguard.GradGuardError.__module__ == 'gradguard'\n"
        "assert gradguard.CATALOGUE['GG101'].name == 'stale-gradient'\n"
        "assert gradguard.Finding and gradguard.SummaryRow\n"
        "assert 'torch' not in sys.modules, 'import gradguard imported torch'\n"
        "assert 'IPython' not in sys.modules, 'import gradguard imported IPython'\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_guard_works_after_a_torch_free_import() -> None:
    """Reaching for `gradguard.guard` imports what it needs, and it catches a bug as before."""
    proc = _python(
        "import sys, gradguard\n"
        "guard = gradguard.guard\n"
        "assert 'torch' in sys.modules\n"
        "import torch\n"
        "model = torch.nn.Linear(2, 1)\n"
        "opt = guard(torch.optim.SGD(model.parameters(), lr=0.1), mode='strict')\n"
        "model(torch.ones(1, 2)).sum().backward()\n"
        "opt.zero_grad()\n"
        "try:\n"
        "    opt.step()\n"
        "except gradguard.ClearedBeforeStepError as exc:\n"
        "    print(exc.finding.code)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["GG102"]


def test_importing_the_testing_helpers_does_not_import_torch() -> None:
    """`import gradguard.testing`, and an empty `capture_findings` block, leave torch out;
    `record` and `capture_findings` then collect findings as before."""
    proc = _python(
        "import sys, gradguard, gradguard.testing\n"
        "with gradguard.testing.capture_findings() as none:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'import gradguard.testing imported torch'\n"
        "import torch\n"
        "model = torch.nn.Linear(2, 1)\n"
        "opt = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), mode='log')\n"
        "with (\n"
        "    gradguard.testing.capture_findings() as captured,\n"
        "    gradguard.testing.record(gradguard.guard_of(opt)) as seen,\n"
        "):\n"
        "    for _ in range(2):\n"
        "        model(torch.ones(1, 2)).sum().backward()\n"
        "        opt.zero_grad()\n"
        "        opt.step()\n"
        "print(*[f.code for f in seen], len(none), captured == seen)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["GG102", "GG102", "0", "True"]


# Each takes longer to import than all of gradguard without them.
_HEAVY = ("torch", "structlog")
_NONE_HEAVY = "heavy imports: none"


def _heavy_imports() -> str:
    """Code printing which of `_HEAVY` the program has imported: `_NONE_HEAVY` for none."""
    return f"print('heavy imports:', *[m for m in {_HEAVY!r} if m in sys.modules] or ['none'])\n"


def test_the_transformers_callback_without_transformers_says_what_to_install() -> None:
    """`gradguard.transformers`, which `import gradguard` leaves out, raises an ImportError
    naming the package to install where transformers is missing, before importing torch."""
    proc = _python(
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "import gradguard\n"
        "assert 'gradguard.transformers' not in sys.modules\n"
        "try:\n"
        "    import gradguard.transformers\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        f"{_heavy_imports()}"
    )
    assert proc.returncode == 0, proc.stderr
    said, imported = proc.stdout.splitlines()
    assert said.startswith("gradguard.transformers needs transformers: pip install transformers")
    assert imported == _NONE_HEAVY


def _cli(*args: str) -> str:
    """A program that runs the ``gradguard`` command with ``args`` and says what it imported."""
    return (
        "import sys\n"
        "from gradguard.cli import main\n"
        "try:\n"
        f"    status = main({list(args)!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"{_heavy_imports()}"
        "sys.exit(status)\n"
    )


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (["--help"], "summarise JSON-lines logs"),
        (["--version"], gradguard.__version__),
        (["run", "--help"], "--mode {warn,strict,log,off}"),
    ],
    ids=["help", "version", "run-help"],
)
def test_the_commands_help_does_not_import_torch(args: list[str], answer: str) -> None:
    """``gradguard --help``, ``--version`` and ``run --help`` answer without torch or structlog."""
    proc = _python(_cli(*args))
    assert proc.returncode == 0, proc.stderr
    assert answer in proc.stdout
    assert proc.stdout.splitlines()[-1] == _NONE_HEAVY


RUN_USAGE_ERRORS: list[tuple[list[str], dict[str, str], str]] = [
    (["run"], {}, "give a script to run, or -m module"),
    (["run", "--mode", "loud", "t.py"], {}, "--mode must be one of warn, strict, log, off"),
    (["run", "t.py"], {"GRADGUARD": "loud"}, "the GRADGUARD environment variable must be one of"),
    (["run", "--ignore", "GG999", "t.py"], {}, "--ignore names unknown finding code 'GG999'"),
    (["run", "--record-norms", "t.py"], {}, "--record-norms needs --log-json PATH"),
]


@pytest.mark.parametrize(
    ("args", "env", "error"),
    RUN_USAGE_ERRORS,
    ids=[" ".join(a + [f"{k}={v}" for k, v in e.items()]) for a, e, _ in RUN_USAGE_ERRORS],
)
def test_a_usage_error_of_run_is_reported_without_importing_torch(
    args: list[str], env: dict[str, str], error: str
) -> None:
    """``gradguard run`` with a bad argument exits 2 naming it, before torch is imported."""
    proc = _python(_cli(*args), **env)
    assert proc.returncode == 2, proc.stderr
    assert error in proc.stderr
    assert proc.stdout.splitlines()[-1] == _NONE_HEAVY


def test_a_bad_gradguard_option_is_reported_without_importing_torch(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pytest --gradguard=loud`` is a usage error naming the option, and torch stays out."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    monkeypatch.delenv("GRADGUARD", raising=False)
    # Only gradguard's plugin: another one that imports torch must not decide this test.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    args = ["-p", "pytest_gradguard", "-p", "no:cacheprovider", "--gradguard=loud"]
    result = pytester.runpython_c(
        f"import sys, pytest\nstatus = pytest.main({args!r})\n{_heavy_imports()}"
        "sys.exit(int(status))\n"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: gradguard: the --gradguard option must be one of" in result.stderr.str()
    assert result.outlines[-1] == _NONE_HEAVY


@pytest.mark.parametrize("plot", [False, True], ids=["table", "plot"])
def test_reporting_on_a_log_does_not_import_torch(tmp_path: Path, plot: bool) -> None:
    """``gradguard report LOG`` prints the table, and ``--plot`` draws it, without torch."""
    log = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=log, record_norms=True)
    try:
        train(bug=False, steps=3)
        train(bug=True, steps=2)
    finally:
        gradguard.uninstall()
    picture = tmp_path / "timeline.png"
    args = ["report", *(["--plot", str(picture)] if plot else []), str(log)]
    proc = _python(_cli(*args))
    assert proc.returncode == 0, proc.stderr
    assert "GG102  cleared-before-step" in proc.stdout
    assert proc.stdout.splitlines()[-1] == _NONE_HEAVY
    assert picture.exists() == plot


def test_structlog_is_imported_only_to_log_an_event() -> None:
    """A finding shown as a warning leaves structlog out; one in log mode is logged through it."""
    proc = _python(
        "import sys, warnings, torch, gradguard\n"
        "def buggy(mode):\n"
        "    model = torch.nn.Linear(2, 1)\n"
        "    opt = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), mode=mode)\n"
        "    model(torch.ones(1, 2)).sum().backward()\n"
        "    opt.zero_grad()\n"
        "    opt.step()\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    buggy('warn')\n"
        "ours = [w.category for w in seen if issubclass(w.category, gradguard.GradGuardWarning)]\n"
        "print(*[category.__name__ for category in ours])\n"
        f"{_heavy_imports()}"
        "buggy('log')\n"
        f"{_heavy_imports()}"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "ClearedBeforeStepWarning",
        "heavy imports: torch",
        "heavy imports: torch structlog",
    ]
    logged = [line for line in proc.stderr.splitlines() if "cleared-before-step" in line]
    assert len(logged) == 1, proc.stderr
    assert "GG102" in logged[0]


def test_every_public_name_is_in_all_and_dir() -> None:
    """`from gradguard import *` finds every name in `__all__`, and `dir()` lists them sorted."""
    namespace: dict[str, object] = {}
    exec("from gradguard import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(gradguard.__all__)
    listed = dir(gradguard)
    assert listed == sorted(listed)
    public = {
        name
        for name in listed
        if not name.startswith("_") and not isinstance(getattr(gradguard, name), types.ModuleType)
    }
    assert public - set(gradguard.__all__) == {"TYPE_CHECKING", "annotations"}


def test_a_misspelt_name_is_an_attribute_error() -> None:
    """An attribute gradguard does not have raises AttributeError naming it, as for any module."""
    with pytest.raises(AttributeError, match="module 'gradguard' has no attribute 'gaurd'"):
        gradguard.gaurd  # type: ignore[attr-defined]  # noqa: B018
