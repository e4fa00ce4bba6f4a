"""Errors and help texts name flags that exist: every ``--flag`` written in a string of the toolchain (and of
nextvit_model) must be an option of a command that can print that string (the module's commands, or a command the
string names), unless the string is a command line of another tool (trtexec, tritonserver, pip). The errors as
printed at run time are checked in tests/test_reliability.py (test_7_flags_in_runtime_errors_...)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from typer.main import get_command

from nextvit_deploy.cli import app

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nextvit_deploy"
MODEL = ROOT / "model"  # nextvit_model: its messages (checkpoint errors) reach every command
FLAG = re.compile(r"(?<![\w-])--[a-z][a-zA-Z0-9-]*")
GLOBAL_FLAGS = {"--help"}
# Functions that build another program's command line: their flags are that program's (trtexec, tritonserver).
FOREIGN_BUILDERS = {("backends/trt_build.py", "trtexec_command"), ("serve/server.py", "command")}
FOREIGN_TEXT = ("trtexec", "--saveEngine=", "tritonserver", "pip install")  # a message quoting such a command line
# Which commands can print a module's strings (first matching prefix wins; unlisted modules: any command).
COMMANDS_OF = {
    "cli/export.py": {"export"},
    "cli/verify.py": {"verify"},
    "cli/bench.py": {"bench"},
    "cli/eval.py": {"eval"},
    "cli/serve.py": {"serve"},
    "cli/triton_repo.py": {"triton-repo"},
    "export/": {"export"},
    "bench": {"bench"},
    "evaluate.py": {"eval"},
    "verify.py": {"verify"},
    "serve/": {"serve", "triton-repo"},
}


def command_flags() -> dict[str, set[str]]:
    group = get_command(app)
    flags = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        flags[name] = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
    return flags


def commands_of(module: str, all_commands: set[str]) -> set[str]:
    for prefix, commands in COMMANDS_OF.items():
        if module.startswith(prefix):
            return commands & all_commands or commands
    return all_commands


def named_commands(text: str, all_commands: set[str]) -> set[str]:
    """Commands a message names as words ("re-export with --batch 1:8", "`nextvit-deploy verify --inputs`")."""
    return {c for c in all_commands if re.search(rf"(?<![\w.]){re.escape(c)}(?![\w.])", text)}


def strings(path: Path, module: str):
    """(line, text) of every user-facing string constant (f-string pieces joined, placeholders as ``{}``): not
    docstrings outside ``cli/`` (there they are help texts) and not inside a foreign command-line builder."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (module, node.name) in FOREIGN_BUILDERS:
            skip |= {id(n) for n in ast.walk(node)}
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                not module.startswith("cli/") and node.body and isinstance(node.body[0], ast.Expr):
            skip.add(id(node.body[0].value))
    for node in ast.walk(tree):
        if id(node) in skip:
            skip |= {id(n) for n in ast.walk(node)}
        elif isinstance(node, ast.JoinedStr):
            skip |= {id(n) for n in ast.walk(node)}
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def wrong_flags() -> list[str]:
    flags = command_flags()
    every = set(flags)
    problems = []
    sources = [(p, p.relative_to(PKG).as_posix()) for p in sorted(PKG.rglob("*.py"))]
    sources += [(p, f"model/{p.relative_to(MODEL).as_posix()}") for p in sorted(MODEL.rglob("*.py")) if MODEL.is_dir()]
    for path, module in sources:
        scope = commands_of(module, every)
        for line, text in strings(path, module):
            named = FLAG.findall(text)
            if not named or any(tool in text for tool in FOREIGN_TEXT):
                continue
            allowed = set(GLOBAL_FLAGS)
            for command in scope | named_commands(text, every):
                allowed |= flags.get(command, set())
            problems += [f"{module}:{line}: {flag} is not an option of {'/'.join(sorted(scope))}: {text[:90]!r}"
                         for flag in named if flag not in allowed]
    return problems


def test_every_flag_in_a_message_exists_in_its_commands_help():
    assert wrong_flags() == []


def test_the_check_catches_a_flag_that_does_not_exist(tmp_path, monkeypatch):
    # The four names an earlier review found in messages; none is an option of any command.
    every = set().union(*command_flags().values())
    for ghost in ("--class-labels", "--features-only", "--min-deployment-target", "--builder-opt-level"):
        assert ghost not in every
    # A module scoped to `verify` that names an `export`-only flag is reported.
    assert "--calib-dir" in command_flags()["export"] and "--calib-dir" not in command_flags()["verify"]
    fake = tmp_path / "verify.py"
    fake.write_text('MSG = f"calibrate: pass --calib-dir {1} or --json"\n')
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODEL", tmp_path / "no-model")
    assert any("--calib-dir" in p for p in wrong_flags())
    fake.write_text('MSG = "re-export with `nextvit-deploy export --calib-dir DIR`"\n')  # naming the command is fine
    assert wrong_flags() == []
    fake.write_text('def f():\n    """Docstrings outside cli/ are not messages: --calib-dir."""\n')
    assert wrong_flags() == []
