"""Through the launcher as a cluster runs it: user errors, signals, Ctrl-C and a dead launcher.

Each case launches `scripts/run_train.sh` with two gloo ranks from a scratch working directory, with
relative paths, and sends signals the way scancel, `sbatch --signal`, a terminal or a killed job step do:
to the launcher (the script execs it, so it is also "torchrun"), and for scancel to the workers as well,
which otherwise see nothing: torchrun starts each in a session of its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from trainer_runs import REPO, TINY_ARGS, read_metrics, run_in_process, worker_env

from titanlm.distributed import init_distributed, report_error
from titanlm.errors import CheckpointError, DataError
from titanlm.launch import Relay, failure_code
from titanlm.stop import Action, StopRequests
from titanlm.train import main as train_main

CONFIG = ["--job.config_file", str(REPO / "train_configs" / "debug_model.toml")]  # run_train.sh's default
# Runs until a signal stops it, and saves only then.
ENDLESS = ["--training.steps", "100000", "--checkpoint.enable", "--checkpoint.interval", "100000"]
# Two ranks of 2 rows: the global batch of TINY_ARGS' 4 rows in one process, so that it can resume.
TWO_RANKS = [*TINY_ARGS, *ENDLESS, "--training.local_batch_size", "2", "--job.dump_folder", "run"]


def start(cwd: Path, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`command` started in `cwd`, in a session of its own as a batch step would be; its output in console.log."""
    with open(cwd / "console.log", "w") as console:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env={**worker_env(), **(env or {})},
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_train_sh(cwd: Path, args: list[str], log_rank: int = 0) -> subprocess.Popen:
    """`NGPU=2 LOG_RANK=log_rank scripts/run_train.sh ARGS` started in `cwd`."""
    return start(
        cwd,
        ["bash", str(REPO / "scripts" / "run_train.sh"), *args],
        {"NGPU": "2", "PYTHON": sys.executable, "LOG_RANK": str(log_rank)},
    )


def children(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until_training(job: subprocess.Popen, dump: Path) -> list[int]:
    """The two workers' pids, once both ranks are past their first step."""
    deadline = time.monotonic() + 180
    while not ((dump / "metrics.jsonl").exists() and read_metrics(dump)):
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    workers = children(job.pid)
    assert len(workers) == 2
    return workers


def end(job: subprocess.Popen, workers: list[int]) -> None:
    """Whatever a failed assertion left behind: the launcher's session and the workers' own."""
    for pid in [job.pid, *workers]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    job.wait(timeout=30)


def complete_steps(dump: Path) -> list[int]:
    folder = dump / "checkpoint"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / ".metadata").exists())


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "args, log_rank, key, code",
    [
        (["--training.steps", "-3"], 0, "config error: training.steps", 2),
        (["--data.dataset", "bin", "--data.train_folder", "data/pretrain"], 0, "data/pretrain", 2),
        (["--training.steps", "-3"], 1, "config error: training.steps", 2),
        (
            ["--optimizer.lr", "1e6", "--training.max_consecutive_skips", "2", "--training.steps", "20"],
            0,
            "error: training diverged",
            3,
        ),
    ],
    ids=["config error", "missing data folder", "rank 0's output hidden", "divergence"],
)
def test_an_error_every_rank_meets_is_one_line_once_and_its_exit_code(tmp_path, args, log_rank, key, code) -> None:
    """Rank 0 prints it; with LOG_RANK hiding rank 0's output the launcher prints rank 0's line instead."""
    job = run_train_sh(tmp_path, [*TINY_ARGS, "--job.dump_folder", "run", *args], log_rank)
    try:
        job.wait(timeout=180)
    finally:
        end(job, [])
    console = (tmp_path / "console.log").read_text()
    assert job.returncode == code, console[-3000:]
    errors = [line for line in console.splitlines() if "error:" in line]
    assert len(errors) == 1 and key in errors[0], console[-3000:]
    assert "Traceback" not in console and "ChildFailedError" not in console and "<NONE>" not in console


@pytest.mark.parametrize(
    "exitcode, expected, code",
    [
        (1, "rank 1 exited with code 1", 1),  # a traceback, which the rank printed
        (-signal.SIGKILL, "rank 1 was killed by SIGKILL", 128 + signal.SIGKILL),
    ],
    ids=["traceback", "SIGKILL"],
)
def test_a_rank_that_left_no_error_line_is_named_with_its_exit(tmp_path, capfd, exitcode, expected, code) -> None:
    """torchrun's stand-in message for a missing error file, "<NONE>", is never shown."""
    failure = ProcessFailure(local_rank=1, pid=1234, exitcode=exitcode, error_file=str(tmp_path / "error.json"))
    assert failure_code(ChildFailedError("titanlm.train", {1: failure}), Relay(), "0") == code
    assert capfd.readouterr().err == f"[launcher]: {expected}\n"


def test_a_rank_without_an_error_file_prints_its_error_with_its_rank(monkeypatch, capsys) -> None:
    """Slurm's task per GPU, or ranks started by hand: no launcher prints another rank's error."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    report_error("error: data folder data/pretrain does not exist")
    assert capsys.readouterr().err == "rank 3: error: data folder data/pretrain does not exist\n"


# ---- a launch environment that cannot start a job: one line, exit 2 -------------------------------

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def one_error_line(err: str, expected: str) -> None:
    assert len(err.splitlines()) == 1 and "error: " in err and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT are not set"),
        ({"WORLD_SIZE": "2", "RANK": "abc"}, "RANK='abc' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "x"}, "MASTER_PORT='x'"),
    ],
    ids=["no MASTER_ADDR", "RANK=abc", "MASTER_PORT=x"],
)
def test_a_process_environment_that_cannot_join_a_job_is_one_line_with_exit_2(
    tmp_path, monkeypatch, capsys, env, expected
) -> None:
    """`RANK=.. WORLD_SIZE=.. python -m titanlm.train`, as a job script started by hand may run it."""
    for name in (*LAUNCH_VARIABLES, "TORCHELASTIC_ERROR_FILE", "TITANLM_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        train_main([*TINY_ARGS, "--job.dump_folder", str(tmp_path / "run")])
    assert info.value.code == 2
    one_error_line(capsys.readouterr().err, expected)


@pytest.mark.parametrize("value, traceback", [("0", False), ("", False), ("off", False), ("1", True)])
def test_titanlm_traceback_0_keeps_the_one_line_and_1_shows_the_traceback(
    tmp_path, monkeypatch, capsys, value, traceback
) -> None:
    monkeypatch.setenv("TITANLM_TRACEBACK", value)
    missing = str(tmp_path / "nope")
    argv = [*TINY_ARGS, "--job.dump_folder", str(tmp_path / "run"), "--data.dataset", "bin"]
    argv += ["--data.train_folder", missing]
    if traceback:
        with pytest.raises(DataError, match="nope does not exist"):
            train_main(argv)
        return
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    assert info.value.code == 2
    one_error_line(capsys.readouterr().err, f"data folder {missing} does not exist")


def launch_env(**variables: str) -> dict[str, str]:
    """This environment without the launch variables, plus `variables`."""
    env = {k: v for k, v in worker_env().items() if k not in (*LAUNCH_VARIABLES, "NGPU", "NNODES", "NODE_RANK")}
    return {**{k: v for k, v in env.items() if not k.startswith(("SLURM_", "PET_"))}, **variables}


@pytest.mark.slow
@pytest.mark.parametrize(
    "env, expected",
    [
        ({"NGPU": "0"}, "NGPU=0"),
        ({"NGPU": "abc"}, "NGPU=abc"),
        ({"NNODES": "two"}, "NNODES=two"),
        ({"NNODES": "2", "MASTER_ADDR": "localhost"}, "NNODES=2 needs NODE_RANK"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "localhost"}, "NODE_RANK=2"),
        ({"NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 needs MASTER_ADDR"),
    ],
    ids=["NGPU=0", "NGPU=abc", "NNODES=two", "no NODE_RANK", "NODE_RANK=2", "no MASTER_ADDR"],
)
def test_run_train_sh_refuses_a_variable_it_cannot_launch_with_in_one_line_with_exit_2(tmp_path, env, expected) -> None:
    command = ["bash", str(REPO / "scripts" / "run_train.sh"), *TINY_ARGS]
    result = subprocess.run(
        command, cwd=tmp_path, env=launch_env(PYTHON=sys.executable, **env), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-3000:]
    one_error_line(result.stderr, expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nproc_per_node", "0"], "--nproc_per_node '0'"),
        (["--nproc_per_node", "abc"], "--nproc_per_node 'abc'"),
        (["--nnodes", "2", "--master_port", "29591"], "--nnodes 2 needs --node_rank"),
    ],
    ids=["no process", "not a number", "no node rank"],
)
def test_the_launcher_refuses_arguments_that_cannot_start_a_job_in_one_line_with_exit_2(
    tmp_path, args, expected
) -> None:
    command = [sys.executable, "-m", "titanlm.launch", *args, "-m", "titanlm.train", *TINY_ARGS]
    result = subprocess.run(command, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    one_error_line(result.stderr, expected)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "sig, to_workers_too, code",
    [
        (signal.SIGTERM, True, 0),  # scancel: every process of the step
        (signal.SIGUSR1, False, 0),  # sbatch --signal=B:USR1 to a batch script that execs run_train.sh
        (signal.SIGINT, False, 130),  # Ctrl-C: the terminal's foreground process group, which the workers left
    ],
    ids=["SIGTERM", "SIGUSR1", "Ctrl-C"],
)
def test_a_signal_to_the_job_saves_on_every_rank_and_the_run_resumes(tmp_path, sig, to_workers_too, code) -> None:
    """Also: relative paths resolve against the directory the script was started in, not the repository."""
    job = run_train_sh(tmp_path, TWO_RANKS)
    workers = []
    try:
        workers = wait_until_training(job, tmp_path / "run")
        for pid in [job.pid, *(workers if to_workers_too else [])]:
            os.kill(pid, sig)
        job.wait(timeout=120)
    finally:
        end(job, workers)
    console = (tmp_path / "console.log").read_text()
    assert job.returncode == code, console[-3000:]
    assert "Traceback" not in console
    stopped_at = read_metrics(tmp_path / "run")[-1]["step"]
    assert complete_steps(tmp_path / "run") == [stopped_at]

    (tmp_path / "run" / "checkpoint" / "STOP").write_text(f"{stopped_at + 2}\n")
    resumed = run_in_process(tmp_path / "run", [*CONFIG, *ENDLESS])
    assert [r["step"] for r in resumed] == [stopped_at + 1, stopped_at + 2]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["run_train.sh", "launch --max-restarts 1"])
def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(tmp_path, launcher) -> None:
    """Also when torchrun may restart failed workers: the aborted ones are not restarted."""
    if launcher == "run_train.sh":
        job = run_train_sh(tmp_path, TWO_RANKS)
    else:
        job = start(
            tmp_path,
            [
                sys.executable,
                "-m",
                "titanlm.launch",
                "--standalone",
                "--nproc_per_node",
                "2",
                "--max-restarts",
                "1",
                "-m",
                "titanlm.train",
                *CONFIG,
                *TWO_RANKS,
            ],
        )
    workers = []
    try:
        workers = wait_until_training(job, tmp_path / "run")
        job.send_signal(signal.SIGINT)
        time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        aborted = time.monotonic()
        job.wait(timeout=60)
        took = time.monotonic() - aborted
    finally:
        end(job, workers)
    console = (tmp_path / "console.log").read_text()
    assert job.returncode == 130 and took < 10, console[-3000:]
    assert "Traceback" not in console
    assert not any(alive(pid) for pid in workers)


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["run_train.sh", "torchrun"])
def test_workers_stop_when_their_launchers_process_group_is_killed(tmp_path, launcher) -> None:
    """As a job step's end (or a user's kill of the group) does: SIGKILL to the launcher's process group,
    which torchrun's workers are not part of. They save, as for scancel, and exit."""
    if launcher == "torchrun":
        job = start(
            tmp_path,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "titanlm.train",
                *CONFIG,
                *TWO_RANKS,
            ],
        )
    else:
        job = run_train_sh(tmp_path, TWO_RANKS)
    workers = []
    try:
        workers = wait_until_training(job, tmp_path / "run")
        os.killpg(job.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), (tmp_path / "console.log").read_text()[-3000:]
    finally:
        end(job, workers)
    assert complete_steps(tmp_path / "run") == [read_metrics(tmp_path / "run")[-1]["step"]]


@pytest.mark.slow
def test_a_worker_whose_launcher_died_exits_after_the_grace_even_if_it_cannot_stop(tmp_path) -> None:
    """A worker blocked where its stop request is never acted on (here: SIGTERM ignored) still exits."""
    worker = (
        "import os, signal, time\n"
        "from titanlm.distributed import exit_with_launcher\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM', flush=True))\n"
        "exit_with_launcher(grace_s=1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**worker_env(), "TORCHELASTIC_RUN_ID": "test"}
    env.pop("TITANLM_LAUNCHER_PID", None)
    launcher = subprocess.Popen(
        ["bash", "-c", '"$0" -c "$1" & echo $!; wait', sys.executable, worker],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pid = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == "ready"
    assert_the_worker_gets_sigterm_when_killed(launcher, pid)


def assert_the_worker_gets_sigterm_when_killed(launcher: subprocess.Popen, pid: int) -> None:
    """Kill the launcher: its worker `pid` must get SIGTERM from its watcher (and print so) and end."""
    try:
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid)
        assert launcher.stdout.read().split() == ["SIGTERM"]
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_worker_behind_a_wrapper_process_runs_and_stops_when_the_launcher_dies() -> None:
    """nsys, a shell script or a --no-python wrapper between the launcher and python is not a dead launcher."""
    worker = (
        "import os, signal, time\n"
        "from titanlm.distributed import exit_with_launcher\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM', flush=True))\n"
        "exit_with_launcher(grace_s=1)\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(120)\n"
    )
    # The launcher names itself in TITANLM_LAUNCHER_PID and starts the worker through a wrapper shell, which
    # stays the worker's parent (bash does not exec a command that another one follows).
    wrapper = '"$0" -c "$1"; exit $?'
    launcher = subprocess.Popen(
        ["bash", "-c", f'TITANLM_LAUNCHER_PID=$$ bash -c \'{wrapper}\' "$0" "$1" & wait', sys.executable, worker],
        env={**worker_env(), "TORCHELASTIC_RUN_ID": "test"},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pid = int(launcher.stdout.readline())
    assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher.pid
    time.sleep(3)  # the watcher looks every second
    assert alive(pid)
    assert_the_worker_gets_sigterm_when_killed(launcher, pid)


@pytest.mark.slow
def test_ctrl_c_is_a_stop_request_and_a_second_one_aborts(tmp_path) -> None:
    script = (
        "import os, signal, time, torch\n"
        "from titanlm.distributed import init_distributed\n"
        "from titanlm.stop import Action, StopRequests\n"
        "init_distributed()\n"
        f"stop = StopRequests({str(tmp_path / 'STOP')!r}, True, torch.device('cpu'))\n"
        "stop.listen()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert stop.poll(1) == Action.SAVE_AND_STOP and stop.exit_code == 130\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(60)\n"
    )
    env = worker_env()
    env.pop("TORCHELASTIC_RUN_ID", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.count("Ctrl-C again aborts") == 1 and result.stderr.count("second Ctrl-C") == 1
    assert "Traceback" not in result.stderr


def test_a_torchrun_worker_takes_every_sigint_as_a_stop_request(tmp_path, monkeypatch) -> None:
    """Slurm and the launcher may each deliver the same Ctrl-C; aborting is the launcher's job there."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    init_distributed()
    stop = StopRequests(str(tmp_path / "STOP"), True, torch.device("cpu"))
    stop.listen()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.poll(1) == Action.SAVE_AND_STOP
        assert stop.stopped_by == signal.SIGINT and stop.exit_code == 0  # the launcher exits 130
    finally:
        stop.close()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16-le BOM", "utf-16-be BOM"])
def test_a_stop_file_is_read_as_editors_and_powershell_write_it(tmp_path, encoding) -> None:
    init_distributed()
    stop_file = tmp_path / "STOP"
    text = " 3\r\n"
    if encoding.endswith("BOM"):  # PowerShell's `>` writes UTF-16 with a byte-order mark
        codec = encoding.removesuffix(" BOM")
        stop_file.write_bytes("\ufeff".encode(codec) + text.encode(codec))
    else:
        stop_file.write_bytes(text.encode(encoding))
    stop = StopRequests(str(stop_file), True, torch.device("cpu"))
    assert [stop.poll(step) for step in (2, 3)] == [Action.NONE, Action.SAVE_AND_STOP]


def test_a_stop_file_that_is_no_step_or_cannot_be_read_is_ignored_with_one_warning(tmp_path, caplog) -> None:
    init_distributed()
    stop_file = tmp_path / "STOP"
    stop_file.write_bytes(b"\x80\x81 five")
    stop = StopRequests(str(stop_file), True, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="titanlm"):
        assert [stop.poll(step) for step in (1, 2)] == [Action.NONE, Action.NONE]
        assert caplog.text.count("not an integer step N or -N; ignored") == 1
        stop_file.unlink()
        stop_file.mkdir()  # while the run goes on
        assert [stop.poll(step) for step in (3, 4)] == [Action.NONE, Action.NONE]
        assert caplog.text.count(f"stop file {stop_file} cannot be read (Is a directory); ignored") == 1


def test_a_folder_at_the_stop_file_s_path_is_refused_at_start_and_nothing_is_written(tmp_path) -> None:
    (tmp_path / "STOP").mkdir()
    with pytest.raises(CheckpointError, match=rf"^checkpoint.stop_file {tmp_path / 'STOP'} is a folder; "):
        run_in_process(tmp_path / "run", ["--checkpoint.enable", "--checkpoint.stop_file", str(tmp_path / "STOP")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["STOP"]
