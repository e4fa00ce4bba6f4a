"""`import nextvit_deploy` and `nextvit-deploy --help` work without the optional packages."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import nextvit_deploy

BLOCKED = ("tensorrt", "coremltools", "timm", "torchvision", "matplotlib")


def _modules() -> list[str]:
    names = ["nextvit_deploy", "nextvit_model"]
    for info in pkgutil.walk_packages(nextvit_deploy.__path__, prefix="nextvit_deploy."):
        names.append(info.name)
    return sorted(names)


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import sys, importlib.abc
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {BLOCKED!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)", name=name)
        sys.meta_path.insert(0, _Block())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_every_module_imports_without_optional_packages():
    modules = _modules()
    assert "nextvit_deploy.cli" in modules and "nextvit_deploy.export.onnx" in modules
    result = _run_blocked(f"""
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        for blocked in {BLOCKED!r}:
            assert blocked not in sys.modules, blocked
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cli_help_without_optional_packages():
    result = _run_blocked("""
        from nextvit_deploy.cli import app
        from typer.testing import CliRunner
        for args in (["--help"], ["export", "--help"], ["verify", "--help"], ["doctor"]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0, (args, r.output)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_missing_optional_dependency_names_the_install_command():
    result = _run_blocked("""
        from nextvit_deploy._deps import require
        from nextvit_deploy.errors import MissingDependency
        try:
            require("coremltools", purpose="Core ML export")
        except MissingDependency as exc:
            print(exc)
    """)
    assert "coremltools is needed for Core ML export but not installed" in result.stdout
    assert "pip install 'nextvit-deploy[coreml]'" in result.stdout
