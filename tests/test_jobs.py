"""The jobs: ``python jobs/<verb>.py`` and ``trprompt <verb>`` run the same function, with no sys.path edits."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import JOBS, job_main
from jobs.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("verb", sorted(JOBS))
def test_script_and_subcommand_call_the_same_function(verb: str) -> None:
    script = importlib.import_module(f"jobs.{verb}")
    below = importlib.import_module(f"cluster.jobs.{verb}")
    assert job_main(verb) is script.main is below.main


def test_no_module_edits_sys_path() -> None:
    offenders = []
    for pkg in ("jobs", "cluster", "actors", "trprompt"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("insert", "append") and \
                        isinstance(node.value, ast.Attribute) and node.value.attr == "path" and \
                        isinstance(node.value.value, ast.Name) and node.value.value.id == "sys":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_train_subcommand_runs_the_train_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", str(ROOT / "configs" / "cpu-demo.yaml"), "--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert cli_main(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert "dry run: 0 stages reused" in out and str(tmp_path / "run") in out
    assert cli_main(["train", "--config", str(ROOT / "configs" / "cpu-demo.yaml"), "--set", "loop.iterations=0"]) == 2
    assert "config error: loop.iterations" in capsys.readouterr().err


def test_the_script_runs_from_another_folder(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: jobs/train.py") and "--set KEY=VALUE" in out.stdout
