"""A newcomer's first commands: every --help works and is fast, --version, lazy Auto registration, quiet loading."""

import argparse
import logging
import runpy
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clusterstm.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_help_prints(script, monkeypatch, capsys):
    """`python scripts/X.py --help` exits 0 (a bare `%` in a dataclass help string used to crash argparse)."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--output_dir" in out


def test_every_cli_option_has_help_and_every_help_prints(capsys):
    parser = build_parser()
    commands = _subcommands(parser)
    assert {"init", "push", "demo", "visualize"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"clusterstm {name}: option {action.dest} has no help text"
        if not sub.add_help:
            # Forwards its flags to its script (precompute-targets): the script's parser prints the help.
            with pytest.raises(SystemExit) as exit_info:
                main([name, "--help"])
            assert exit_info.value.code == 0
            assert "--teacher_name_or_path" in capsys.readouterr().out
            continue
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: clusterstm {name}" in capsys.readouterr().out


def test_version(capsys):
    import clusterstm

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clusterstm {clusterstm.__version__}"


def test_cli_help_imports_neither_torch_nor_transformers():
    """The robust form of "help is instant": the help of every sub-command runs without loading torch."""
    done = _run_python(
        """
        import contextlib, io, sys
        from clusterstm.cli import build_parser, main
        names = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"][0].choices
        # precompute-targets forwards --help to its script's HfArgumentParser (the pretraining flags), which loads
        # the training stack; every other help is answered by the CLI alone.
        names = [name for name in names if name != "precompute-targets"]
        for argv in [["--help"], ["--version"]] + [[name, "--help"] for name in names]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main(argv)
        print(sorted(m for m in ("torch", "transformers", "numpy", "matplotlib") if m in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_cli_help_is_fast():
    """`clusterstm --help` as a fresh process; the bound is generous (shared, loaded CI machines), the point is
    that it is not the 7-60 s of importing torch and transformers."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "clusterstm.cli", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and "--version" in done.stdout
    assert elapsed < 3.0, f"clusterstm --help took {elapsed:.1f} s"


@pytest.fixture(scope="module")
def pretraining_checkpoint(tmp_path_factory):
    from clusterstm.hub.export import init_checkpoint

    # `init` writes ClusterSTMForPreTraining weights: the pretraining heads are in the file.
    return init_checkpoint("tiny", tmp_path_factory.mktemp("front_door") / "ckpt", seed=0)


@pytest.mark.parametrize("import_first", ["clusterstm", "transformers", "clusterstm.models.modeling_clusterstm"])
def test_import_clusterstm_registers_auto_classes_lazily(pretraining_checkpoint, import_first):
    """`import clusterstm` alone imports no transformers; Auto classes still load the folder without remote code,
    whatever was imported first (including a ClusterSTM module that itself imports transformers)."""
    done = _run_python(
        f"""
        import sys
        import {import_first}
        import clusterstm
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(pretraining_checkpoint)!r})
        processor = AutoProcessor.from_pretrained({str(pretraining_checkpoint)!r})
        print(type(model).__name__, type(processor).__name__)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ClusterSTMModel", "ClusterSTMProcessor"]
    plain = _run_python("import sys, clusterstm; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert plain.stdout.strip() == "False False", plain.stderr


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_from_a_pretraining_checkpoint_is_quiet(pretraining_checkpoint):
    """The pretraining heads are not reported as UNEXPECTED (as for BERT's pretraining checkpoints); a task head
    that really is new (QA) is still reported as newly initialised."""
    from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForVisualQuestionAnswering

    from clusterstm import ClusterSTMForVideoTextRetrieval

    handler = _Collect()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        for loader in (AutoModel, AutoModelForImageTextToText, ClusterSTMForVideoTextRetrieval):
            loader.from_pretrained(pretraining_checkpoint)
        assert not [m for m in handler.messages if "UNEXPECTED" in m], handler.messages
        AutoModelForVisualQuestionAnswering.from_pretrained(pretraining_checkpoint)
    finally:
        transformers_logger.removeHandler(handler)
    text = "\n".join(handler.messages)
    assert "UNEXPECTED" not in text
    assert "MISSING" in text and "qa_head" in text


def test_quickstart_test_command_reports_durations_and_skips():
    quickstart = (REPO / "quickstart.sh").read_text()
    test_line = next(line for line in quickstart.splitlines() if line.strip().startswith("test)"))
    assert "--durations 15" in test_line and "-rs" in test_line


def test_pyproject_license_is_an_spdx_string():
    """A `{text = ...}` table makes setuptools>=77 print a deprecation warning on every build."""
    import re

    text = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the package supports 3.10)
    assert re.search(r'^license = "Apache-2.0"$', text, re.M)
    assert re.search(r'^requires = \[.*"setuptools>=77"', text, re.M)
