"""Sweeps (scripts/tune.py): trials as ordinary runs, pruning, the results a sweep leaves, many
workers on one journal file or one real PostgreSQL server, one-line mistakes, and SIGTERM."""

import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from alexnet_lit.evaluation.run_page import REPORT
from alexnet_lit.training.cli import cli_main
from alexnet_lit.training.sweep import TERMINATED, load_search_space, process_space, tune_main
from tests.conftest import make_image_folder
from tests.helpers import DEFAULT_CONFIG, TINY, free_port, read_csv, start_script
from tests.signals import kill_at

LR = "model.optimizer.init_args.lr"
DROPOUT = "model.dropout"
# One short epoch: 3 classes x 2 training images, batches of 2 (TINY), 3 steps.
SHORT = ("--trainer.max_epochs=1", "--trainer.num_sanity_val_steps=0")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), splits={"train": 2, "val": 1})


def search_file(folder: Path, text: str) -> Path:
    path = folder / "search.yaml"
    path.write_text(text)
    return path


def tune_args(search: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--config", DEFAULT_CONFIG, "--search", str(search), f"--data.data_dir={data}", *TINY,
        *SHORT, *extra,
    ]  # fmt: skip


def journal_study(sweep_dir: Path, name: str) -> optuna.Study:
    """The study a sweep keeps in its folder, through Optuna's public API."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "journal.log"))
    )
    return optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True
    )


@pytest.mark.slow
def test_sweep_runs_trials_as_runs_and_never_picks_a_diverging_one(
    data, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    search = search_file(
        tmp_path, f"{LR}: {{choice: [10000.0, 1.0e-3]}}\n{DROPOUT}: {{float: [0.2, 0.7]}}\n"
    )
    sweep_dir = tmp_path / "lightning_logs" / "sweeps" / "search"
    study = journal_study(sweep_dir, "search")
    # Trial 0's loss overflows to NaN in its first epoch. (At lr 10 this AlexNet collapses to
    # chance instead, and scores chance.)
    for lr in (10000.0, 1.0e-3):
        study.enqueue_trial({LR: lr})

    code = tune_main(tune_args(search, data, "--trials", "2"))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]

    rows = {int(row["number"]): row for row in read_csv(sweep_dir / "sweep.csv")}
    assert [rows[n]["state"] for n in range(2)] == ["pruned", "complete"]
    assert "diverged at epoch 0" in rows[0]["note"]
    assert "trial 0 done: lr=1e+04, " in out and "-> diverged at epoch 0" in out
    dropouts = [float(rows[n][DROPOUT]) for n in range(2)]
    assert dropouts[0] != dropouts[1] and all(0.2 <= d <= 0.7 for d in dropouts)
    run = sweep_dir / "trial_1"  # an ordinary run
    assert (run / "report.html").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    # Only the best trial keeps its checkpoints.
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert not list((sweep_dir / "trial_0" / "checkpoints").glob("*.ckpt"))

    page = (sweep_dir / "sweep.html").read_text()
    assert "trial_1/report.html" in page and "<script" not in page
    assert page.count("data:image/png;base64,") >= 2  # history and slices, inlined

    best = sweep_dir / "best.yaml"
    overlay = yaml.safe_load(best.read_text())
    assert overlay["model"]["optimizer"]["init_args"]["lr"] == 1.0e-3
    assert overlay["model"]["dropout"] == pytest.approx(dropouts[1])
    assert "logger" not in overlay.get("trainer", {})
    rerun = f"--config {DEFAULT_CONFIG} --config {best}"
    assert f"best: trial 1, val/acc {float(rows[1]['best_val_acc']):.4f}" in out
    assert "re-run it: python scripts/train.py fit" in out

    # best.yaml re-runs the best trial: same values, its own run folder.
    cli_main(["fit", *rerun.split()])
    config = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert config["model"]["dropout"] == pytest.approx(dropouts[1])
    assert config["model"]["optimizer"]["init_args"]["lr"] == 1.0e-3

    # Checking the trial's checkpoint with its own config.yaml (docs/inference.md) makes a run
    # folder of its own and leaves the trial's record as the sweep wrote it (its report.html
    # is rebuilt to list the evaluation).
    def record() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != REPORT}

    written = record()
    (best_ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
    cli_main(["validate", "--config", str(run / "config.yaml"), f"--ckpt_path={best_ckpt}"])
    assert record() == written
    assert (sweep_dir / "version_0" / "val_report.md").is_file()


@pytest.mark.slow
def test_a_trial_that_trails_the_median_is_pruned_and_says_so(
    data, tmp_path, capsys, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    search = search_file(tmp_path, f"{DROPOUT}: {{float: [0.2, 0.7]}}\n")
    sweep_dir = tmp_path / "lightning_logs" / "sweeps" / "search"
    study = journal_study(sweep_dir, "search")
    study.add_trial(  # an earlier trial that was perfect from its first epoch
        optuna.trial.create_trial(
            params={DROPOUT: 0.5},
            distributions={DROPOUT: optuna.distributions.FloatDistribution(0.2, 0.7)},
            value=1.0,
            intermediate_values={0: 1.0, 1: 1.0, 2: 1.0},
        )
    )
    args = tune_args(search, data, "--trials", "2", "--trainer.max_epochs=3")
    code = tune_main([*args, "--prune-after-trials", "1", "--prune-warmup-epochs", "0"])
    out, err = capsys.readouterr()
    assert code == 0, (out + err)[-3000:]
    assert "Pruned at epoch 0: val/acc" in caplog.text  # from the fit, when it stops
    assert "trial 1 done: dropout=" in out and "-> pruned at epoch 0;" in out
    row = read_csv(sweep_dir / "sweep.csv")[1]
    assert (row["state"], row["note"]) == ("pruned", "pruned at epoch 0")
    # It stopped like an early-stopped fit: one epoch, a complete run folder.
    assert (sweep_dir / "trial_1" / "report.html").is_file()
    assert study.trials[1].intermediate_values.keys() == {0}


@pytest.mark.slow
def test_two_workers_share_one_journal_file(data, tmp_path):
    search = search_file(tmp_path, f"{DROPOUT}: {{float: [0.2, 0.7]}}\n")
    args = [*tune_args(search, data, "--trials", "2", "--study", "shared")]
    workers = [start_script("tune.py", args, tmp_path) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, (out + err)[-3000:]
    assert_shared_study(journal_study(tmp_path / "lightning_logs" / "sweeps" / "shared", "shared"))


def assert_shared_study(study: optuna.Study) -> None:
    """Every trial number once, all trials finished and recorded, both workers at work."""
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials))) and len(trials) >= 2
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    for trial in trials:
        assert (Path(trial.user_attrs["run_dir"]) / "report.html").is_file()


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))  # Debian's layout
    return installed[-1].parent if installed else None


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster in tmp_path on a free 127.0.0.1 port; yields its URL."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("ALEXNET_LIT_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL's initdb is not installed; .ci/run installs it.")
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed here; .ci/run installs them")
    cluster = tmp_path / "postgres"
    cluster.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as 'postgres'
        pwd.getpwnam("postgres")
        shutil.chown(cluster, "postgres")
        for folder in [tmp_path, *tmp_path.parents]:
            if folder in (Path("/"), Path("/tmp")):
                break
            folder.chmod(folder.stat().st_mode | 0o001)  # let it pass through, not list
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data_dir = cluster / "data"

    def run(*command: str | Path) -> None:
        subprocess.run([*as_user, *map(str, command)], check=True, capture_output=True)

    run(bin_dir / "initdb", "-D", data_dir, "-A", "trust", "-U", "postgres")
    options = f"-k {cluster} -p {port} -c listen_addresses=127.0.0.1"
    run(bin_dir / "pg_ctl", "-D", data_dir, "-o", options, "-l", cluster / "log", "start", "-w")
    try:
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sweeps")
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        run(bin_dir / "pg_ctl", "-D", data_dir, "stop", "-m", "fast")


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(data, tmp_path, postgres):
    search = search_file(tmp_path, f"{DROPOUT}: {{float: [0.2, 0.7]}}\n")
    args = tune_args(search, data, "--trials", "2", "--study", "lab", "--storage", postgres)
    # Two machines: each worker with its own folder, one study in the database.
    folders = [tmp_path / f"machine_{i}" for i in range(2)]
    for folder in folders:
        folder.mkdir()
    workers = [start_script("tune.py", args, folder) for folder in folders]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, (out + err)[-3000:]
    assert_shared_study(optuna.load_study(study_name="lab", storage=postgres))
    # Each machine's sweep.csv lists every trial, wherever it ran.
    for folder in folders:
        assert len(read_csv(folder / "lightning_logs" / "sweeps" / "lab" / "sweep.csv")) >= 2


@pytest.mark.parametrize(
    ("search", "extra", "expected"),
    [
        ("model.dropoutt: {float: [0.2, 0.7]}", [], "'model.dropoutt' is not a key"),
        ("model.dropout: {float: [0.7, 0.2]}", [], "the low end 0.7 is above the high end 0.2"),
        ("data.augment: {choice: []}", [], "'data.augment': choice needs a non-empty list"),
        ("data.augment: {choice: [tutorial, wild]}", [], "data.augment"),
        ("model.dropout: {float: [0.2, 0.7], step: 0}", [], "step must be a positive float"),
        ("model.dropout: {float: [0.2, 0.7]}", ["--trials", "0"], "--trials must be at least 1"),
        ("model.dropout: {float: [0.2, 0.7]}", ["--trials", "x"], "invalid int value: 'x'"),
        (
            "model.dropout: {float: [0.2, 0.7]}",
            ["--storage", "mysql://someone:secret@127.0.0.1:1/sweeps"],
            "needs the database driver",
        ),
        (
            "model.dropout: {float: [0.2, 0.7]}",
            ["--storage", "postgresql://someone:secret@127.0.0.1:1/sweeps"],
            "cannot open the study storage postgresql://someone:***@127.0.0.1:1/sweeps",
        ),
        ("model.dropout: {float: [0.2, 0.7]}", ["--storage", "."], "--storage '.' is a folder"),
        (
            "model.dropout: {float: [0.2, 0.7]}",
            ["--sweep-dir", "search.yaml/sweep"],
            "--sweep-dir 'search.yaml/sweep' cannot be written ('search.yaml' is a file",
        ),
    ],
)
def test_bad_input_is_one_line(search, extra, expected, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = search_file(tmp_path, search + "\n")
    assert tune_main(tune_args(path, data, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "secret" not in err[0]
    assert not (tmp_path / "lightning_logs").exists()  # nothing half-made


@pytest.mark.slow
def test_stopped_workers_leave_no_trial_running_and_the_next_run_continues(data, tmp_path):
    search = search_file(tmp_path, f"{DROPOUT}: {{float: [0.2, 0.7]}}\n")
    # --study: the runs differ in the test's signal callbacks, which is fine to continue with.
    args = tune_args(search, data, "--trials", "2", "--study", "search")
    sweep_dir = tmp_path / "lightning_logs" / "sweeps" / "search"

    def run(*extra: str) -> tuple[int, str, str]:
        worker = start_script("tune.py", [*args, *extra], tmp_path)
        out, err = worker.communicate(timeout=600)
        return worker.returncode, out, err

    # 1. SIGTERM at trial 0's second step, as `kill PID` sends it: that trial fails.
    code, out, err = run(*kill_at(1, "SIGTERM"))
    assert code == TERMINATED, (out + err)[-3000:]
    assert err.strip().splitlines()[-1] == (
        "error: trial 0 stopped by SIGTERM; it is marked failed in the study. Run the same "
        "command to continue."
    )
    # 2. A worker killed outright (SIGKILL, the out-of-memory killer) leaves its trial running
    # in the journal, which has no heartbeat...
    orphan = journal_study(sweep_dir, "search").ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    orphan.set_user_attr("process", f"{process_space()}/{_dead_pid()}")
    # 3. ...until the next worker on this machine sees that its worker is gone. This one gets
    # SIGTERM as trial 2's training ends, after Lightning's last look for one: trial 2
    # completes, and the worker stops instead of starting trial 3.
    code, out, err = run("--trainer.callbacks+=tests.signals.SignalAtTrainEnd")
    assert code == TERMINATED, (out + err)[-3000:]
    assert "note: trial 1's worker" in out and "0 of 2 trials finished" in out
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM after its trial")
    trials = journal_study(sweep_dir, "search").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert trials[0].user_attrs["note"] == "stopped by SIGTERM"
    rows = read_csv(sweep_dir / "sweep.csv")  # written on the way out
    assert [row["state"] for row in rows] == ["fail", "fail", "complete"]


def _dead_pid() -> int:
    """The process ID of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_missing_extra_is_one_line(monkeypatch, tmp_path, capsys):
    from alexnet_lit.training import sweep

    monkeypatch.setattr(sweep, "optuna", None)
    path = search_file(tmp_path, "model.dropout: {float: [0.2, 0.7]}\n")
    assert tune_main(["--search", str(path)]) == 2
    assert "pip install -e '.[tune]'" in capsys.readouterr().err


def test_search_file_values_become_cli_arguments():
    from alexnet_lit.training.sweep import value_arg

    assert value_arg("data.hflip", True) == "--data.hflip=true"
    assert value_arg("model.weights", None) == "--model.weights=null"
    assert value_arg(LR, 1.0e-4) == f"--{LR}=0.0001"


def test_a_study_with_other_fit_arguments_is_not_continued_by_default(
    data, tmp_path, capsys, monkeypatch
):
    from optuna.distributions import distribution_to_json

    monkeypatch.chdir(tmp_path)
    search = search_file(tmp_path, f"{DROPOUT}: {{float: [0.2, 0.7]}}\n")
    study = journal_study(tmp_path / "lightning_logs" / "sweeps" / "search", "search")
    space = {k: json.loads(distribution_to_json(d)) for k, d in load_search_space(search).items()}
    study.set_user_attr("search_space", space)
    study.set_user_attr("fit_args", ["--trainer.max_epochs=30"])
    assert tune_main(tune_args(search, data, "--trials", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study 'search' began with other fit arguments" in err[0], err
    assert "--study search" in err[0] and study.trials == []


def test_a_trial_on_several_devices_is_refused_in_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    search = search_file(tmp_path, f"{DROPOUT}: {{float: [0.2, 0.7]}}\n")
    args = tune_args(search, data, "--trials", "1", "--trainer.strategy=ddp")
    assert tune_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a sweep trial trains on one device") and len(err) == 1, err
