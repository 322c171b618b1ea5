"""SIGKILL at a random point of the long jobs, then the same command again (issue 13, item 4).

Each long job (``medxfer bank build``, the CC-FV study with the quick preset, TATL
cross-validation) runs in a subprocess that is killed at a random moment after its first unit
finished (the unit's marker exists); the same command then runs again. It must complete, leave
every unit that was finished at the kill untouched (marker and checkpoint files keep their
mtimes; the study logs how many steps it found done), and give the results of an uninterrupted
run (Dice / scores / evaluation JSON values, bank checkpoint sha256). Everything runs on the CPU
with fixed seeds and no DataLoader workers, so the uninterrupted reference is reproducible; the
study's reference is the session's ``quick_study`` (tests/conftest.py, shared with test_study.py).

The kill point is drawn from ``MEDXFER_FAULT_SEED`` (random when unset; every assertion message
names it, so a failure can be replayed). The marker logic itself is tested without processes at
the end of the file (fast).
"""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from medxfer.cli import main
from medxfer.data.synth.isic import generate_isic
from medxfer.handlers.bank_saver import (BankCheckpointer, finished_pretraining, pretraining_marker,
                                         purge_pretraining, read_pretraining_marker, write_pretraining_marker)
from medxfer.study import StudyConfig, run_study
from medxfer.transfer.bank import ModelBank, sha256_file
from medxfer.workflows.bundle import bundle_dir
from medxfer.workflows.seg2d_transfer import run_pretraining
from medxfer.workflows.tatl_skin import run_cross_validation

SEED = int(os.environ.get("MEDXFER_FAULT_SEED", time.time_ns() % 100_000))
RNG = random.Random(SEED)
REPO = Path(__file__).resolve().parents[1]
#: One torch thread in the killed processes and in this one (as the ``quick_study`` reference):
#: the thread count changes the last bits of CPU convolutions, and one thread is the fast choice
#: on a shared 2-core machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_and_kill(args, log: Path, ready, max_delay: float, timeout: float = 300) -> dict:
    """Start ``args``; once ``ready()`` is true wait a random ``0..max_delay`` s, then SIGKILL it
    (by its pid). Returns ``{"delay", "killed"}`` (``killed`` false if it had finished already)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **ONE_THREAD})
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{args[:3]} ended (exit {proc.returncode}) before the kill point:\n"
                                     f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no marker after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        delay = RNG.uniform(0, max_delay)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:  # an assertion above: do not leave it running
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"delay": delay, "killed": killed}


def _why(kill: dict, what: str) -> str:
    why = (f"MEDXFER_FAULT_SEED={SEED}: killed {kill['delay']:.2f} s after {what}"
           f"{'' if kill['killed'] else ' (it had finished already)'}")
    print(why)  # shown with -s, and with the output of a failing test
    return why


def _mtimes(paths) -> dict:
    return {Path(p): Path(p).stat().st_mtime_ns for p in paths}


def _done_pretraining(bank_root: Path) -> list[Path]:
    """The done markers of a bank's pretraining runs and the checkpoints they vouch for."""
    found = []
    for marker in _published(bank_root / "pretraining", "*.json"):
        data = json.loads(marker.read_text())
        if data["state"] == "done":
            found += [marker] + [bank_root / "checkpoints" / f"{e}.pt" for e in data["entries"]]
    return found


def _published(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` under their final names: a kill during an atomic write leaves its
    hidden temporary file (``.<stem>-XXXX.json``), which is not a marker (the rerun redoes that unit)."""
    return sorted(p for p in root.glob(pattern) if not p.name.startswith("."))


def _bank_digests(bank_root: Path) -> dict:
    bank = ModelBank.open(bank_root)
    return {e.name: sha256_file(bank.verify(e.name)) for e in bank}


def _bank_config(path: Path) -> Path:
    """The quick study's pretraining settings as a bank definition for `medxfer bank build`."""
    quick = StudyConfig.quick()
    path.write_text(json.dumps({"archs": quick.archs, "patch_size": quick.patch_size, "epochs": quick.pretrain_epochs,
                                "bank_epochs": [], "optimizer": "adamw", "learning_rate": quick.learning_rate,
                                "n_folds": 5}))
    return path


# --- medxfer bank build ------------------------------------------------------------------------

def _cli(args) -> tuple[int, str, str]:
    """``medxfer ARGS`` in this process: (exit code, stdout, stderr). Redirected to buffers that stay
    open, not pytest's capsys: the bundle runs bind logging handlers to the current stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_killed_bank_build_resumes_without_redoing_finished_runs(quick_study, study_data, tmp_path):
    data, out = tmp_path / "msd", tmp_path / "bank"
    shutil.copytree(study_data, data)
    args = ["bank", "build", "--data", str(data), "--target", "Task09_Spleen", "--out", str(out),
            "--config", str(_bank_config(tmp_path / "bank.yaml")), "--device", "cpu"]
    first = pretraining_marker(out, "unet_Task03_Liver")
    kill = _run_and_kill([sys.executable, "-m", "medxfer.cli", *args], tmp_path / "killed.log",
                         lambda: first.exists() and json.loads(first.read_text())["state"] == "done", max_delay=1.5)
    why = _why(kill, "the liver pretraining finished")
    finished = _mtimes(_done_pretraining(out))
    code, printed, _ = _cli(args)
    assert code == 0, why
    assert "unet_Task03_Liver_e1  (already done, kept)" in printed, (printed, why)
    assert _mtimes(finished) == finished, why  # finished runs: neither retrained nor rewritten
    bank = ModelBank.open(out)
    assert sorted(bank.names()) == ["unet_Task03_Liver_e1", "unet_Task06_Lung_e1", "unet_scratch"], why
    reference = _bank_digests(quick_study["out"] / "bank")  # the study's pool: the same pretraining settings
    assert {n: reference[n] for n in bank.names()} == _bank_digests(out), why
    summary = json.loads((out / "build_summary.json").read_text())
    assert "unet_Task03_Liver" in summary["already_done"], why
    assert _cli(["bank", "list", str(out)])[0] == 0

    # the same command once more: everything is done; other settings are refused in one line
    code, printed, _ = _cli(args)
    assert code == 0 and "resumed: 2 of 2 pretraining run(s) were already done" in printed
    code, _, err = _cli(args + ["--epochs", "2"])
    err = err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "bank_build.json: this bank was built with other settings" in err, err
    assert _bank_digests(out) == {n: reference[n] for n in bank.names()}
    # --overwrite: everything rebuilt (the same bytes: the runs are seeded)
    markers = _mtimes(_published(out / "pretraining", "*.json"))
    code, printed, _ = _cli(args + ["--overwrite"])
    assert code == 0 and "(already done, kept)" not in printed
    assert all(p.stat().st_mtime_ns != t for p, t in markers.items())
    assert _bank_digests(out) == {n: reference[n] for n in bank.names()}


# --- the CC-FV study (quick preset) --------------------------------------------------------------

STUDY = ("import sys; from medxfer.study import StudyConfig, run_study; c = StudyConfig.quick(); c.device = 'cpu'; "
         "run_study(sys.argv[1], sys.argv[2], c, progress=False)")


def _study_steps_done(out: Path) -> list[Path]:
    """Markers of the study's finished steps (pretraining runs, scorings, fine-tunings)."""
    found = [m for m in _done_pretraining(out / "bank") if m.parent.name == "pretraining"]
    found += [p for p in (out / "scores").glob("*/scores.state.json") if json.loads(p.read_text())["done"]]
    return found + sorted((out / "finetune").glob("*/*/result.json"))


def _without_timings(study: dict) -> dict:
    return {k: v for k, v in study.items() if k not in ("seconds", "scoring_over_finetuning_time")}


def _rows(scores_json: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in json.loads(scores_json.read_text())["rows"]]


def test_killed_study_resumes_and_ends_with_the_results_of_an_uninterrupted_run(quick_study, study_data, tmp_path):
    data, out = tmp_path / "msd", tmp_path / "study"
    shutil.copytree(study_data, data)
    phase = RNG.choice(["pretraining", "scoring", "fine-tuning"])
    ready = {"pretraining": lambda: bool(_done_pretraining(out / "bank")),
             "scoring": lambda: any(_published(out / "scores", "*/scores.partial/*.json")),
             "fine-tuning": lambda: any((out / "finetune").glob("*/*/result.json"))}[phase]
    kill = _run_and_kill([sys.executable, "-c", STUDY, str(data), str(out)], tmp_path / "killed.log", ready, 2.0)
    why = _why(kill, f"the first {phase} step finished")
    steps_done = _study_steps_done(out)
    finished = _mtimes(steps_done + _done_pretraining(out / "bank") + _published(out / "scores", "*/scores.partial/*.json"))

    config = StudyConfig.quick()
    config.device = "cpu"
    log: list[str] = []
    run_study(data, out, config, progress=False, log=log.append)
    resumed = [line for line in log if line.startswith("resuming:")]
    assert resumed and resumed[0].startswith(f"resuming: {len(steps_done)} of 7 steps already done"), (resumed, why)
    assert _mtimes(finished) == finished, why  # nothing finished was redone (rows of scored models included)

    ref = quick_study["out"]
    for name in ("finetune_dice.csv", "table.csv", "te_evaluation.json", "te_evaluation.csv"):
        assert (out / name).read_text() == (ref / name).read_text(), (name, why)
    assert _without_timings(json.loads((out / "study.json").read_text())) == \
        _without_timings(json.loads((ref / "study.json").read_text())), why
    scores = "scores/Task09_Spleen/scores.json"
    assert _rows(out / scores) == _rows(ref / scores), why
    assert _bank_digests(out / "bank") == _bank_digests(ref / "bank"), why


# --- TATL cross-validation ------------------------------------------------------------------------

TATL = dict(stages=(1, 3), arches=("unet_effb0",), working_size=(32, 32), max_epochs=1, n_folds=3, batch_size=4,
            tune_fraction=0.25)
TATL_CODE = ("import sys, json; from medxfer.workflows.tatl_skin import run_cross_validation; "
             "run_cross_validation(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), folds=[0], device='cpu')")


def _model_digests(run: Path) -> dict:
    return {p.parent.name: sha256_file(p) for p in sorted((run / "fold_0").glob("*/model.pt"))}


def test_killed_tatl_cross_validation_resumes_and_equals_an_uninterrupted_run(tmp_path):
    # 6 tiny ISIC 2017 images, stages 1 + 3, U-shape only: a Segment-Net (+ boxes) and 4 target networks
    data, bundle = generate_isic(tmp_path / "isic", year=2017, num_images=6, size=(64, 64), seed=0), bundle_dir("tatl_skin")
    run_cross_validation(bundle, data, tmp_path / "reference", TATL, folds=[0], device="cpu")
    run = tmp_path / "run"
    # the kill comes during the boxes / a target network, the next networks, or the evaluation and report
    after, marker = RNG.choice([("the Segment-Net finished", "segment_net/done.json"),
                                ("the boxes were written", "boxes_done.json"),
                                ("the last network finished", "target_streaks_unet_effb0/done.json")])
    kill = _run_and_kill([sys.executable, "-c", TATL_CODE, str(bundle), str(data), str(run), json.dumps(TATL)],
                         tmp_path / "killed.log", (run / "fold_0" / marker).exists, max_delay=2.0)
    why = _why(kill, after)
    finished = _mtimes(p for p in [*run.glob("fold_0/*/done.json"), *run.glob("fold_0/*/model.pt"),
                                   *run.glob("fold_0/*_done.json")]
                       if p.name != "model.pt" or (p.parent / "done.json").exists())
    run_cross_validation(bundle, data, run, TATL, folds=[0], device="cpu")
    for name in ("cv_scores.json", "cv_scores.csv", "fold_0/scores.json"):  # JSON: NaN != NaN in a dict
        assert (run / name).read_text() == (tmp_path / "reference" / name).read_text(), (name, why)
    assert _mtimes(finished) == finished, why
    assert _model_digests(run) == _model_digests(tmp_path / "reference"), why
    assert json.loads((run / "fold_0" / "boxes.json").read_text()) == \
        json.loads((tmp_path / "reference" / "fold_0" / "boxes.json").read_text()), why


# --- the markers, without processes ---------------------------------------------------------------

def _linear_bank(root: Path, names=("lin_e1", "lin_e2")) -> ModelBank:
    bank = ModelBank.open(root, create=True)
    torch.manual_seed(0)
    for name in names:
        bank.add(name, torch.nn.Linear(3, 2), arch="unet", in_channels=3, out_channels=2, patch_size=[4, 4],
                 source=["T"], epoch=int(name.rsplit("e", 1)[1]))
    return bank


def test_a_pretraining_marker_is_trusted_only_for_its_settings_and_intact_entries(tmp_path):
    bank = _linear_bank(tmp_path)
    settings = {"arch": "lin", "epochs": 2}
    entries = {n: bank.get(n).sha256 for n in bank.names()}
    write_pretraining_marker(tmp_path, "lin", settings, "running")
    assert finished_pretraining(tmp_path, "lin", settings) is None  # killed while running
    write_pretraining_marker(tmp_path, "lin", settings, "done", entries)
    assert finished_pretraining(tmp_path, "lin", settings)["entries"] == entries
    assert finished_pretraining(tmp_path, "lin", {"arch": "lin", "epochs": 3}) is None  # other settings
    ckpt = tmp_path / bank.get("lin_e2").checkpoint
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-8] + bytes(8))
    assert finished_pretraining(tmp_path, "lin", settings) is None  # the file changed under the manifest
    ckpt.write_bytes(data)
    ModelBank(tmp_path, [e for e in bank if e.name != "lin_e2"], bank.description).save()
    assert finished_pretraining(tmp_path, "lin", settings) is None  # an entry of the run is missing

    # what a killed run may leave: a file without manifest entry, an atomic write's temporary file
    (tmp_path / "checkpoints" / ".lin_e3-abc123.pt.part").write_bytes(b"half")
    (tmp_path / "checkpoints" / "linear_e1.pt").write_bytes(b"another run's")  # not ours: kept
    assert purge_pretraining(tmp_path, "lin") == ["lin_e1"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["linear_e1.pt"]
    assert ModelBank.open(tmp_path).names() == [] and read_pretraining_marker(tmp_path, "lin") is None


def _pretrain(tmp_path: Path, settings: dict, max_epochs: int = 2, overwrite: bool = False, fail_at: int | None = None):
    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        if engine.state.epoch == fail_at:
            raise KeyboardInterrupt  # stands in for the kill
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()

    engine = Engine(step)
    saver = BankCheckpointer(tmp_path, "lin", net, arch="unet", in_channels=3, out_channels=2, patch_size=[4, 4],
                             epochs=[1], overwrite=overwrite, settings=settings)
    saver.attach(engine)
    return engine, saver, [torch.ones(2, 3)], max_epochs


def test_bank_checkpointer_with_settings_redoes_a_killed_pretraining_and_refuses_mixing(tmp_path):
    settings = {"arch": "lin", "max_epochs": 2}
    engine, saver, data, epochs = _pretrain(tmp_path, settings, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        engine.run(data, max_epochs=epochs)
    assert ModelBank.open(tmp_path).names() == ["lin_e1"] and read_pretraining_marker(tmp_path, "lin")["state"] == "running"

    engine, saver, data, epochs = _pretrain(tmp_path, settings)  # the same command again: from scratch
    engine.run(data, max_epochs=epochs)
    marker = finished_pretraining(tmp_path, "lin", settings)
    assert sorted(marker["entries"]) == ["lin_e1", "lin_e2"] and saver.saved == ["lin_e1", "lin_e2"]
    digests = _bank_digests(tmp_path)
    engine, saver, data, epochs = _pretrain(tmp_path / "fresh", settings)
    engine.run(data, max_epochs=epochs)
    assert _bank_digests(tmp_path / "fresh") == digests  # equal to an uninterrupted run

    class Untouchable:
        def run(self):
            raise AssertionError("a finished pretraining must not be trained again")

    run_pretraining(Untouchable(), saver)  # finished with these settings: skipped (no error)
    before = _mtimes((tmp_path / "checkpoints").iterdir())
    engine, saver, data, epochs = _pretrain(tmp_path, {"arch": "lin", "max_epochs": 3}, max_epochs=3)
    with pytest.raises(FileExistsError, match="other settings .*max_epochs.*overwrite_bank"):
        engine.run(data, max_epochs=epochs)
    assert _mtimes(before) == before
    engine, saver, data, epochs = _pretrain(tmp_path, {"arch": "lin", "max_epochs": 3}, max_epochs=3, overwrite=True)
    engine.run(data, max_epochs=epochs)
    assert ModelBank.open(tmp_path).names() == ["lin_e1", "lin_e3"]  # the old run's entries replaced, not mixed
    foreign = tmp_path / "foreign"
    _linear_bank(foreign, ["lin_e1"])  # entries of unknown origin (no marker): refused
    engine, saver, data, epochs = _pretrain(foreign, settings)
    with pytest.raises(FileExistsError, match="not written by a resumable pretraining"):
        engine.run(data, max_epochs=epochs)

