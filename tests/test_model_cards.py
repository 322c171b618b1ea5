"""Every documented command runs, exactly as written, from the folder its document says (issue 13, item 7).

The runnable commands of the README and of each model card (``bundles/*/docs/README.md``) are
the lines of their fenced ``bash`` blocks (``text`` blocks are syntax references and are not run).
A document's commands run in order, as one session, in a temporary copy of the repository's
``README.md``, ``configs/`` and ``bundles/`` (nothing is written into the checkout, which the test
checks), starting in the folder the document names: the repository root for the README, the
bundle folder for a card (the card says so: "Run from this folder (`bundles/<name>`)"). Then:

- ``make demo`` / ``make test`` are not run (CI runs both); any other command a document does not
  want run carries the comment ``# [not run by the card test: <reason>]`` on the line above it;
- a comment ``# -> FILE ...`` after a command lists files (globs allowed, relative to the folder
  the command ran in) the command must have produced;
- ``python -m MODULE ARGS`` runs in this process through ``runpy`` with ``sys.argv`` as the
  interpreter would set it (``monai.bundle``'s own ``__main__`` and its ``fire.Fire()``), and
  ``medxfer ARGS`` through ``medxfer.cli.main`` (the console script's function): a new interpreter
  costs ~6 s of imports per command. One ``python -m monai.bundle run`` (the transferability
  card's ``evaluate``) runs as a real process instead, and the same command in process gives the
  same result: the in-process path is faithful;
- ``cd DIR`` changes the folder of the next commands; anything else runs with ``bash -c``, with
  the environment's ``bin`` folder first on ``PATH``.

nnU-Net planning (a subprocess of 10-40 s) of byte-identical data is replayed within the test
session: the cards generate the same small tasks, so each profile is planned for real once.

The last test checks the short-error path of item 6 with a real ``python -m monai.bundle run``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medxfer.cli import main as medxfer_main
from medxfer.workflows.errors import format_error

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: document -> the folder its commands start in (the document says so, checked below)
DOCS = {
    "README.md": ".",
    "bundles/msd_seg3d/docs/README.md": "bundles/msd_seg3d",
    "bundles/transferability/docs/README.md": "bundles/transferability",
    "bundles/tatl_skin/docs/README.md": "bundles/tatl_skin",
    "bundles/seg2d_transfer/docs/README.md": "bundles/seg2d_transfer",
}
#: run by CI itself (`make test` would run this test again; `make demo` takes about 10 minutes)
CI_RUNS = (["make", "demo"], ["make", "test"])
#: (document, text in the command): the one command run as a real `python -m monai.bundle run`
REAL_PROCESS = ("bundles/transferability/docs/README.md", "configs/evaluate.yaml")

SKIP = re.compile(r"^#\s*\[not run by the card test:\s*(?P<reason>[^\]]+)\]\s*$")
PRODUCES = re.compile(r"^#\s*->\s*(?P<files>\S.*)$")
COPIED = ("README.md", "configs", "bundles")
IGNORED = shutil.ignore_patterns("runs", "bank", "bank_*", "data", "__pycache__", "*.pt", "*.ts", "plans.json",
                                 "error.log")


@dataclass
class Command:
    text: str                  # as written (continuation lines joined)
    line: int                  # line of the document where it starts
    skip: str | None = None    # reason, when the document marks it not to be run
    produces: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def document_commands(markdown: str) -> list[Command]:
    """The commands of the fenced ``bash`` blocks of ``markdown``, in order."""
    commands: list[Command] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        i += 1
        skip, last, pending = None, None, None  # pending: a command continued with a backslash
        while i < len(lines) and lines[i].strip() != "```":
            raw = lines[i].rstrip()
            stripped = raw.strip()
            if pending is not None:
                pending.text += " " + stripped.rstrip("\\").strip()
                if not stripped.endswith("\\"):
                    pending = None
            elif not stripped:
                skip, last = None, None
            elif stripped.startswith("#"):
                if SKIP.match(stripped):
                    skip = SKIP.match(stripped).group("reason")
                elif PRODUCES.match(stripped) and last is not None:
                    last.produces += PRODUCES.match(stripped).group("files").split()
            else:
                last = Command(stripped.rstrip("\\").strip(), i + 1, skip)
                commands.append(last)
                skip = None
                if stripped.endswith("\\"):
                    pending = last
            i += 1
        i += 1
    return commands


# --- nnU-Net planning, replayed for byte-identical data ------------------------------------------

_PLANNED: dict = {}


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def replay_planning(monkeypatch, tmp_path_factory):
    """``medxfer.planning.nnunet._run`` (the nnU-Net subprocess) replayed from this session's earlier
    run on the same raw data and arguments; the first run of each is real."""
    import medxfer.planning.nnunet as nnunet

    real = getattr(nnunet, "_run", None)
    if real is None:
        return

    def run(tool, args, env, log):
        if tool != "nnUNetv2_plan_and_preprocess":
            return real(tool, args, env, log)
        key = (tool, tuple(args), _tree_digest(Path(env["nnUNet_raw"])))
        out = Path(env["nnUNet_preprocessed"])
        if key not in _PLANNED:
            real(tool, args, env, log)
            keep = tmp_path_factory.mktemp("nnunet_plans") / "pre"  # pytest's session folder: removed with it
            shutil.copytree(out, keep)
            _PLANNED[key] = keep
        else:
            shutil.copytree(_PLANNED[key], out, dirs_exist_ok=True)

    monkeypatch.setattr(nnunet, "_run", run)


# --- running one command ---------------------------------------------------------------------------

def _exit_code(code) -> int:
    return 0 if code is None else code if isinstance(code, int) else 1


@contextlib.contextmanager
def _logging_restored():
    """The root logger's handlers and level as before: a bundle's ``configs/logging.conf`` (applied by
    MONAI with ``fileConfig``) would otherwise leave handlers on pytest's closed capture streams."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def _in_process(argv: list[str], cwd: Path, monkeypatch) -> int:
    with _logging_restored():
        return _run_in_process(argv, cwd, monkeypatch)


def _run_in_process(argv: list[str], cwd: Path, monkeypatch) -> int:
    monkeypatch.chdir(cwd)
    if argv[0] == "medxfer":
        try:
            return _exit_code(medxfer_main(argv[1:]))
        except SystemExit as e:
            return _exit_code(e.code)
    module = argv[2]
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [module, *argv[3:]])
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        except SystemExit as e:
            return _exit_code(e.code)
    return 0


def _environment(tmp: Path) -> dict:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        env[var] = str(tmp / ".cache" / var.lower())
    return env


def _subprocess(command: Command, cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command.text], cwd=cwd, env=_environment(tmp), capture_output=True, text=True,
                          timeout=600)


def _layout_copy(tmp: Path) -> Path:
    root = tmp / "repo"
    root.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=IGNORED)
        else:
            shutil.copy2(source, root / name)
    return root


def _untracked(paths=("bundles", "configs", "data", "runs", "README.md")) -> set[str]:
    """Untracked and ignored files of the checkout under ``paths`` (what a run could leave behind)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", *paths],
                          cwd=REPO, capture_output=True, text=True)
    return {line[3:] for line in proc.stdout.splitlines() if line[:2] in ("??", "!!") and "__pycache__" not in line}


def _check_produced(command: Command, cwd: Path) -> None:
    for pattern in command.produces:
        matches = [p for p in cwd.glob(pattern)] if any(c in pattern for c in "*?[") else \
            ([cwd / pattern] if (cwd / pattern).exists() else [])
        assert matches, f"line {command.line}: `{command.text}` did not produce {pattern} (in {cwd})"


def _faithful(command: Command, cwd: Path, monkeypatch) -> None:
    """The real process's outputs == the same command in this process (in a copy of its folder
    without the command's output folders)."""
    twin = cwd.parent / (cwd.name + "_in_process")
    shutil.copytree(cwd, twin)
    for p in command.produces:
        folder = (twin / p).parent
        shutil.rmtree(folder, ignore_errors=True) if folder != twin else (twin / p).unlink(missing_ok=True)
    assert _in_process(command.argv, twin, monkeypatch) == 0
    outputs = [p for p in command.produces if p.endswith(".json")]
    assert outputs, f"line {command.line}: list a JSON output of `{command.text}` to compare"
    for p in outputs:
        real, here = json.loads((cwd / p).read_text()), json.loads((twin / p).read_text())
        assert real == here, f"{p}: the real process and the in-process run differ"


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (a loaded machine stretches wall time)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _report(document: str, timings: list, skipped: list, capsys) -> None:
    """Seconds per command and the commands not run, on the terminal (``-s`` not needed)."""
    lines = [f"{document}: {len(timings)} commands run, {len(skipped)} not run"]
    lines += [f"  {seconds:6.1f} s wall {cpu:6.1f} s cpu  {text}" for seconds, cpu, text in timings]
    lines += [f"  not run: {text[:70]}  ({reason})" for text, reason in skipped]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("document", list(DOCS))
def test_documented_commands_run_as_written(document, tmp_path, monkeypatch, replay_planning, capsys):
    text = (REPO / document).read_text()
    start = DOCS[document]
    if start == ".":
        assert "from the repository root" in text, f"{document} must say where its commands run"
    else:
        assert f"Run from this folder (`{start}`)" in text, f"{document} must say where its commands run"
    commands = document_commands(text)
    assert commands, f"{document}: no bash block"
    before = _untracked()
    root = _layout_copy(tmp_path)
    cwd = root / start
    timings, skipped, real_runs = [], [], 0
    try:
        for command in commands:
            argv = command.argv
            if not argv or argv in CI_RUNS or command.skip:
                skipped.append((command.text, command.skip or "CI runs it"))
                continue
            t0, c0 = time.perf_counter(), _cpu_seconds()
            real = document == REAL_PROCESS[0] and REAL_PROCESS[1] in command.text
            real_runs += real
            if argv[0] == "cd":
                assert len(argv) == 2, command.text
                cwd = (cwd / argv[1]).resolve()
                assert cwd.is_dir() and (cwd == root or root in cwd.parents), f"line {command.line}: `{command.text}`"
                continue
            if real or not (argv[0] == "medxfer" or argv[:2] == ["python", "-m"]):
                proc = _subprocess(command, cwd, tmp_path)
                assert proc.returncode == 0, (f"{document} line {command.line}: `{command.text}` exit {proc.returncode}\n"
                                              f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                rc = 0
            else:
                try:
                    rc = _in_process(argv, cwd, monkeypatch)
                except Exception as e:  # noqa: BLE001 - reported with the document line and its one-line cause
                    raise AssertionError(f"{document} line {command.line}: `{command.text}` failed: {format_error(e)}") from e
            if rc != 0:
                captured = capsys.readouterr()
                raise AssertionError(f"{document} line {command.line}: `{command.text}` exit {rc}\n"
                                     f"{captured.out[-2000:]}\n{captured.err[-2000:]}")
            _check_produced(command, cwd)
            if real:
                _faithful(command, cwd, monkeypatch)
            timings.append((time.perf_counter() - t0, _cpu_seconds() - c0, command.text[:90]))
    finally:
        _report(document, timings, skipped, capsys)
    assert _untracked() - before == set(), "a documented command wrote into the checkout"
    assert real_runs == (document == REAL_PROCESS[0]), "the command run as a real process is not in its document"


def test_document_parser_reads_continuations_skips_and_outputs():
    text = "\n".join([
        "```text", "medxfer synth msd --out DIR [--seed 0]", "```",
        "```bash", "# a comment", "medxfer synth msd --out data \\", "    --seed 1   # trailing", "# -> data/x data/y*",
        "", "# [not run by the card test: needs two GPUs]", "torchrun -m monai.bundle run \\", "  --config_file a.yaml",
        "make demo", "```"])
    commands = document_commands(text)
    assert [c.argv for c in commands] == [["medxfer", "synth", "msd", "--out", "data", "--seed", "1"],
                                          ["torchrun", "-m", "monai.bundle", "run", "--config_file", "a.yaml"],
                                          ["make", "demo"]]
    assert commands[0].produces == ["data/x", "data/y*"] and commands[0].skip is None and commands[0].line == 6
    assert commands[1].skip == "needs two GPUs" and commands[2].skip is None


def test_a_failing_bundle_run_ends_in_one_line_naming_the_path(tmp_path):
    """Item 6: `python -m monai.bundle run` with a data_root that does not exist: exit 1, the last
    stderr line names the folder and the log file, the traceback is in the log and not on stderr."""
    bundle = tmp_path / "transferability"
    shutil.copytree(REPO / "bundles" / "transferability", bundle, ignore=IGNORED)
    missing = tmp_path / "nowhere" / "Task09_Spleen"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/score.yaml",
                           "--bundle_root", ".", "--bank_root", "bank", "--data_root", str(missing),
                           "--output_dir", "runs/scores"], cwd=bundle, env=_environment(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    log = bundle / "runs" / "scores" / "error.log"
    assert last.startswith(f"medxfer: {missing}") and last.endswith("(traceback in runs/scores/error.log)"), last
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "Traceback (most recent call last)" in log.read_text() and "DatasetError" in log.read_text()
