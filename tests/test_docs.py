"""Docs that run: every code block of README.md and docs/*.md is run, in order, per page.

A page's blocks share one scratch folder, so a later command can read what an earlier one
wrote (``--json plan.json``, then ``--plan plan.json``). A fenced block of any language whose
first line is ``# file: NAME`` is written to that folder before anything on the page runs.

- ``python`` blocks run as a script of their own (a fresh interpreter, this checkout first on
  the path) and must exit 0. A block that is a sketch rather than a program (an interface
  outline) says so on its first line, ``# not run: <why>``; the test reports them.
- ``$ autopart ...`` runs ``partitioner.cli.main`` in-process (the console script may point at
  another checkout; in-process is also seconds faster per command) and must exit 0.
- ``$ python ...`` and ``$ torchrun ...`` run as subprocesses with this checkout first on the
  path (``torchrun`` as ``python -m torch.distributed.run``) and must exit 0.
- ``$ pip ...`` is not run: installing is CI's job, not a test's.
- README.md's ``sh`` blocks show autopart at full size (GPT-3 175B on 64 nodes, the whole test
  suite): there every ``autopart`` command (also under torchrun) is parsed by the real argument
  parser, not run; docs/guide.md runs the same commands at small sizes.

Anything else in a console block fails the test, so that a new kind of command gets a runner
here instead of going untested. In ``console`` blocks the commands are the ``$ `` lines (the rest
is output); in ``sh`` blocks every line that is not a comment is a command. Pages that launch
processes (torchrun) are marked slow.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import transformers  # noqa: F401  # imported before any output capture, as in test_cli.py

from partitioner.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run: "
FENCE = re.compile(r"^```(\w*)\s*$")


def steps(page: Path) -> list[tuple[str, int, str, str]]:
    """(kind, line, text, language) in page order: kind is "file" or "command"."""
    out: list[tuple[str, int, str, str]] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i + 1
        j = start
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[start:j]
        if body and body[0].startswith("# file: "):
            out.append(("file", start + 1, "\n".join(body) + "\n", body[0][len("# file: "):].strip()))
        elif lang == "python":
            out.append(("python", start + 1, "\n".join(body) + "\n", lang))
        elif lang == "sh":  # every line that is not a comment is a command
            for k, text in enumerate(body, start + 1):
                if text.strip() and not text.lstrip().startswith("#"):
                    out.append(("command", k, text.split(" #")[0].strip(), lang))
        elif lang == "console":
            pending, first = "", 0
            for k, text in enumerate(body, start + 1):
                if text.startswith("$ ") or pending:
                    if not pending:
                        text, first = text[2:], k
                    if text.endswith("\\"):
                        pending += text[:-1] + " "
                        continue
                    out.append(("command", first, pending + text, lang))
                    pending = ""
        i = j + 1
    return out


def pages_with_code() -> list:
    """Every page with a command or a Python block; those that launch processes are marked slow."""
    out = []
    for p in DOCS:
        found = steps(p)
        if not any(kind in ("command", "python") for kind, *_ in found):
            continue
        launches = any(kind == "command" and t.split()[0] == "torchrun" for kind, _, t, lang in found
                       if not (p == README and lang == "sh"))
        out.append(pytest.param(p, marks=pytest.mark.slow) if launches else p)
    return out


def parse_only(argv: list[str], where: str) -> None:
    """README's full-size commands: each ``autopart`` command line must parse (``&&`` chains split)."""
    from partitioner.cli import build_parser

    words = list(argv)
    while words:
        cut = words.index("&&") if "&&" in words else len(words)
        part, words = words[:cut], words[cut + 1:]
        if part[0] == "torchrun" and "partitioner.cli" in part:
            part = ["autopart", *part[part.index("partitioner.cli") + 1:]]
        if part[0] == "autopart":
            try:
                build_parser().parse_args(part[1:])
            except SystemExit as exc:
                raise AssertionError(f"{where}: `{shlex.join(part)}` does not parse (exit {exc.code})") from None
        elif part[0] not in ("pip", "python"):
            raise AssertionError(f"{where}: the docs test does not know {part[0]!r}; add a runner in tests/test_docs.py")


def run_python(code: str, cwd: Path, where: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: the Python block exited {proc.returncode}:\n{proc.stderr[-3000:]}"


def run_command(argv: list[str], cwd: Path, where: str) -> None:
    if argv[0] == "autopart":
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv[1:])
        assert rc == 0, f"{where}: `{shlex.join(argv)}` exited {rc}:\n{err.getvalue()}{out.getvalue()[-2000:]}"
        return
    if argv[0] == "python":
        cmd = [sys.executable, *argv[1:]]
    elif argv[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        raise AssertionError(f"{where}: the docs test does not know how to run {argv[0]!r}; add a runner in tests/test_docs.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: `{shlex.join(argv)}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("page", pages_with_code(), ids=lambda p: p.name)
def test_every_code_block_in_the_docs_runs(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sketches = []
    found = steps(page)
    for kind, line, text, extra in found:  # files first: a page may show a file after the code that reads it
        if kind == "file":
            (tmp_path / extra).write_text(text)
    for kind, line, text, extra in found:
        where = f"{page.relative_to(ROOT)}:{line}"
        if kind == "file":
            continue
        if kind == "python":
            if text.startswith(NOT_RUN):
                assert text.splitlines()[0][len(NOT_RUN):].strip(), f"{where}: say why the block is not run"
                sketches.append(where)
                continue
            run_python(text, tmp_path, where)
            continue
        argv = shlex.split(text)
        if page == README and extra == "sh":
            parse_only(argv, where)
            continue
        if argv[0] == "pip":
            continue
        run_command(argv, tmp_path, where)


def test_the_guide_covers_the_topics_and_has_commands():
    guide = ROOT / "docs" / "guide.md"
    text = guide.read_text()
    for heading in ("## Installing", "## Planning a Hugging Face model", "## Pinning choices", "## Reading a plan",
                    "## Running with torchrun", "## Writing a cluster file", "## Adding a baseline method"):
        assert heading in text, heading
    commands = [t for kind, _, t, _ in steps(guide) if kind == "command"]
    assert any(c.startswith("torchrun ") and " run --plan " in c for c in commands)
    assert any("--explain" in c for c in commands) and any(c.startswith("autopart compare") for c in commands)


def test_the_extractor_reads_files_commands_and_continuations(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```toml\n# file: c.toml\nnodes = 1\n```\n"
        "```console\n$ autopart plan \\\n  --model gpt2-tiny\noutput line\n$ pip install x\n```\n"
        "```sh\n# a comment\nautopart inspect --list  # trailing comment\n```\n"
    )
    found = steps(page)
    assert found[0] == ("file", 2, "# file: c.toml\nnodes = 1\n", "c.toml")
    assert [(k, line, shlex.split(t)) for k, line, t, _ in found[1:]] == [
        ("command", 6, ["autopart", "plan", "--model", "gpt2-tiny"]),
        ("command", 9, ["pip", "install", "x"]),
        ("command", 13, ["autopart", "inspect", "--list"]),
    ]
