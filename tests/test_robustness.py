"""Nothing lost, nothing half-written, no traceback (issue 22): each kind of hostile input or event the sweep
found, run against the scripts as real processes.

Bad input is exit code 2 and exactly one stderr line, 'error: ...', naming what is wrong (train.py's progress
bars aside), and the files it touches are byte-identical before and after, with no file or directory left
behind. SIGTERM is exit code 143 after the same cleanup as Ctrl-C. Two processes writing one directory: the
second is refused. A full disk, a file-size limit (EFBIG) and a read-only directory fail in one line that keeps
the earlier files.

Each case is its own process (its own exit status, signals, working directory, environment, umask, rlimits and
standard streams), forked from a server that imported torch once (see Launcher): the file takes about half a
minute on 2 busy cores, where ~55 interpreters each importing torch would take several. The text is made up (no
test here needs Tiny Shakespeare); the cases that tokenize skip without GPT-2's BPE ranks, and the full disk needs
root (to mount a tmpfs).
"""
import atexit
import ctypes
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from conftest import REPO, require_gpt2_ranks, write_byte_data
from model import Transformer
from model_config import ModelConfig

# ---- each case its own process ------------------------------------------------------------------

# What multiprocessing's fork server imports before it forks each case: the imports that cost seconds.
PRELOAD = ["numpy", "torch", "tqdm", "tiktoken", "tiktoken_ext.openai_public", "safetensors.torch",
           "matplotlib.figure", "pytest"]
GiB = 1 << 30
MEMORY_LIMIT = 6 * GiB  # RLIMIT_AS of every case: a hostile size fails in the case, not on the machine
WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def drop_root_file_access() -> None:
    """As root, give up CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER (capset(2)), so that file modes bind
    this process as they bind any user's; a user's process has nothing to give up."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    sets = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: capabilities 0-31, then 32-63
    if libc.capget(header, sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for i in range(3):
        sets[i] &= ~0b1110  # capabilities 1, 2 and 3
    if libc.capset(header, sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def become_script(argv, cwd, env, stdout, stderr, limits, umask, drop_root):
    """In the forked child: set up as `cd cwd; env -i ENV python argv... <devnull >stdout 2>stderr` would, run
    argv[0] as __main__, and end as the interpreter would: its SystemExit code, 1 after a traceback, killed by
    SIGINT after an uncaught KeyboardInterrupt, 120 when flushing stdout fails at exit."""
    os.setpgid(0, 0)  # its own process group, so that a kill reaches whatever it started
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, WRITE), (2, stderr, WRITE)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.umask(umask)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name, value in limits.items():
        resource.setrlimit(name, (value, value))
    if drop_root:
        drop_root_file_access()
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # what a fresh torch reads from it (this one is the server's)
    sys.stdin, sys.stdout = open(0, closefd=False), open(1, "w", closefd=False)  # stdout block-buffered
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = list(argv)
    ours = {REPO, REPO / "tests"}
    sys.path[:] = [str(Path(argv[0]).parent)] + [p for p in sys.path if p and Path(p).resolve() not in ours]
    for name in [name for name, module in sys.modules.items()  # the repo's modules import afresh, with env
                 if Path(getattr(module, "__file__", None) or "/").resolve().parent in ours]:
        del sys.modules[name]
    code = 1
    try:
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message")
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
    threading._shutdown()  # what the interpreter does at exit: join threads, run atexit, flush stdout
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except OSError as err:
        print(f"Exception ignored in: {sys.stdout!r}\n{type(err).__name__}: {err}", file=sys.stderr)
        code = code or 120
    sys.stderr.flush()
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


class Script:
    """A started case: wait(timeout) -> its exit code (negative: the signal that killed it) or None while it
    runs; signal(); kill(); its stdout and stderr as written so far."""

    def __init__(self, process, argv, stdout: Path, stderr: Path):
        self.process, self.argv, self.stdout_path, self.stderr_path = process, argv, stdout, stderr

    def wait(self, timeout: float) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    @property
    def returncode(self):
        return self.process.exitcode

    def signal(self, signum):
        if self.process.is_alive():
            os.kill(self.process.pid, signum)

    def kill(self):
        """SIGKILL to its process group (whatever it started too), then reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # ended already, or killed before it made its group
            if self.process.is_alive():
                os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    @staticmethod
    def _tail(path: Path) -> str:
        """The last MiB of a captured stream (never /dev/full, which reads zeros forever)."""
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - (1 << 20)))
            return f.read().decode("utf-8", "replace")

    @property
    def stdout(self) -> str:
        return self._tail(self.stdout_path)

    @property
    def stderr(self) -> str:
        return self._tail(self.stderr_path)


class Launcher:
    """Starts each case as its own process, forked by multiprocessing's fork server (a fresh interpreter that has
    imported PRELOAD) and set up by become_script. Every wait has a time limit, after which the case and what it
    started are killed; close() kills any still running and stops the server."""

    def __init__(self, logs: Path):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.logs, self.started = logs, []
        self.env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: see conftest.one_thread

    def start(self, argv, cwd=None, stdout=None, env=None, memory=MEMORY_LIMIT, file_size=None, umask=0o022,
              drop_root=False) -> Script:
        """argv[0] is the script's path; stdout a file (default: a new log), e.g. /dev/full; env variables on top
        of this process's; file_size an RLIMIT_FSIZE in bytes (writes past it fail with EFBIG); drop_root: see
        drop_root_file_access."""
        n = len(self.started)
        stdout, stderr = Path(stdout or self.logs / f"{n}.out"), self.logs / f"{n}.err"
        limits = {resource.RLIMIT_AS: memory} | ({resource.RLIMIT_FSIZE: file_size} if file_size else {})
        argv = [str(arg) for arg in argv]
        process = self.context.Process(target=become_script, args=(
            argv, str(cwd or self.logs), self.env | (env or {}), str(stdout), str(stderr), limits, umask, drop_root))
        process.start()
        self.started.append(Script(process, argv, stdout, stderr))
        return self.started[-1]

    def run(self, argv, cwd=None, timeout=30, **how) -> Script:
        """start() and wait; a case still running after timeout seconds is killed and fails the test."""
        script = self.start(argv, cwd, **how)
        if script.wait(timeout) is None:
            script.kill()
            pytest.fail(f"{show(argv)}: still running after {timeout} s (killed)\n{script.stderr[-1500:]}")
        return script

    def close(self):
        for script in self.started:
            if script.process.is_alive():
                script.kill()
        multiprocessing.forkserver._forkserver._stop()  # else it lives, holding torch, until pytest exits


def show(argv) -> str:
    return " ".join(str(arg) for arg in argv).replace(f"{REPO}/", "")


def S(name) -> str:
    """A script's path in the repo under test."""
    return str(REPO / name)


def wait_for(condition, timeout: float, script: Script) -> bool:
    """Poll condition() until it holds (True), or the time is up or the script has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and script.returncode is None:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# ---- what a case printed and what it left --------------------------------------------------------

PROGRESS = re.compile(r"\d+%\||\|\s*\d+/\d+|\[\d\d:\d\d|\d+(\.\d+)?(it|step|tok|B)/s")


def stderr_lines(stderr: str) -> list[str]:
    """stderr's lines, without tqdm's progress-bar redraws."""
    return [segment.rstrip() for line in stderr.split("\n") for segment in line.split("\r")
            if segment.strip() and not PROGRESS.search(segment)]


def snapshot(*directories) -> dict:
    """path -> what it is, for everything below directories: a file's size, mode and sha256 (a sparse file's
    size, mode and mtime instead: hashing a hostile 64 GiB of zeros would take minutes), a directory, or the mode
    of anything else (a named pipe is never opened)."""
    found = {}
    for directory in map(Path, directories):
        for path in sorted(directory.rglob("*")):
            st = path.lstat()
            if path.is_dir():
                found[path] = "directory"
            elif not path.is_file():
                found[path] = ("not a regular file", st.st_mode)
            elif st.st_blocks * 512 < st.st_size // 2:
                found[path] = (st.st_size, st.st_mode, "sparse", st.st_mtime_ns)
            else:
                found[path] = (st.st_size, st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def changes(before: dict, after: dict, allowed=()) -> list[str]:
    """What differs between two snapshots (paths matching an allowed regex aside)."""
    return [f"{'added' if path not in before else 'removed' if path not in after else 'changed'} {path}"
            for path in sorted(before.keys() | after.keys())
            if before.get(path) != after.get(path) and not any(re.search(p, str(path)) for p in allowed)]


def assert_refused(launcher, argv, names: str, watch=(), allowed=(), timeout=30, **how) -> Script:
    """Run argv and assert the rule for bad input: exit code 2, no traceback, exactly one stderr line (progress
    bars aside), 'error: ' and then a message matching the regex names, which names no temporary file and not
    None as a file; everything below watch as it was, nothing added (paths matching an allowed regex aside)."""
    before = snapshot(*watch)
    script = launcher.run(argv, timeout=timeout, **how)
    said = f"{show(argv)}: exit {script.returncode}\nstderr:\n{script.stderr[-2000:]}"
    assert "Traceback" not in script.stderr, said
    assert script.returncode == 2, said
    lines = stderr_lines(script.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), said
    assert re.search(names, lines[0]), f"the message does not match /{names}/: {said}"
    assert not re.search(r"(^|[/ '\"])\.[\w.-]+\.tmp\b|\bNone: ", lines[0]), f"names a temp file or None: {said}"
    assert changes(before, snapshot(*watch), allowed) == [], said
    return script


def assert_terminated_cleanly(script: Script):
    """SIGTERM's rule: exit code 143 (128 + 15) after the cleanup, one line saying so, no traceback."""
    said = f"{show(script.argv)}: exit {script.returncode}\nstderr:\n{script.stderr[-2000:]}"
    assert script.returncode == 128 + signal.SIGTERM and stderr_lines(script.stderr) == ["terminated"], said


def signalled_once(launcher, argv, ready, signum, timeout=30) -> Script:
    """Start argv, send it signum as soon as ready() holds, and wait for it to end."""
    script = launcher.start(argv)
    if not wait_for(ready, timeout, script):
        script.kill()
        pytest.fail(f"{show(argv)}: the moment to send the signal never came (exit {script.returncode})\n"
                    f"{script.stderr[-1500:]}")
    script.signal(signum)
    if script.wait(timeout) is None:
        script.kill()
        pytest.fail(f"{show(argv)}: still running {timeout} s after {signal.Signals(signum).name} (killed)")
    return script


# ---- fixtures: built with the repo's own scripts --------------------------------------------------

def made_up_text(n_bytes: int, seed=0) -> str:
    rng = random.Random(seed)
    words = "the king queen sword crown night day love war bread river stone café naïve".split()
    lines, size = [], 0
    while size < n_bytes:
        lines.append(" ".join(rng.choice(words) for _ in range(12)) + "\n")
        size += len(lines[-1].encode())
    return "".join(lines)


# The tiny run every checkpoint case starts from: 4 steps, evaluated and saved every 2.
TINY_RUN = ["--preset", "tiny", "--vocab-size", 256, "--block-size", 32, "--batch-size", 2, "--eval-iters", 1,
            "--eval-interval", 2, "--log-interval", 1, "--device", "cpu"]


def train_argv(data, out, *more, iters=2):
    return [S("train.py"), *TINY_RUN, "--max-iters", iters, "--data-dir", data, "--out-dir", out, *more]


def resume_argv(run, data, iters=6):
    return [S("train.py"), "--resume", "--out-dir", run, "--max-iters", iters, "--data-dir", data]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("logs"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def byte_data(workdir) -> Path:
    """60 kB of made-up text as byte tokens (vocab 256) in workdir/bytes: 54,000 for train, 6,000 for val.
    Overrides conftest's Tiny Shakespeare bytes, so that these tests run without the corpus."""
    tokens = np.frombuffer(made_up_text(60_000).encode()[:60_000], dtype=np.uint8)
    (workdir / "bytes").mkdir()
    return write_byte_data(workdir / "bytes", tokens, val_tokens=6_000)


@pytest.fixture(scope="module")
def finished_run(launcher, workdir, byte_data) -> Path:
    """A finished 4-step run in workdir/run, trained from workdir with a relative --data-dir (bytes)."""
    script = launcher.run(train_argv("bytes", "run", iters=4), workdir, timeout=120)
    assert script.returncode == 0, script.stderr[-2000:]
    return workdir / "run"


@pytest.fixture(scope="module")
def hf_export(launcher, workdir, finished_run) -> Path:
    """finished_run's best.pt exported for Hugging Face (config.json, model.safetensors)."""
    script = launcher.run([S("convert_hf.py"), "export", "--ckpt", finished_run / "best.pt", "--out-dir",
                           workdir / "hf"], timeout=120)
    assert script.returncode == 0, script.stderr[-2000:]
    return workdir / "hf"


@pytest.fixture(scope="module")
def gpt2_vocab_checkpoint(workdir) -> Path:
    """The tiny preset with GPT-2's vocabulary and random weights: a model test.py samples from."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, workdir / "gpt2-vocab.pt")
    return workdir / "gpt2-vocab.pt"


def copy_of(directory: Path, into: Path) -> Path:
    return Path(shutil.copytree(directory, into / directory.name))


def edited_config(hf_export: Path, into: Path, **changes) -> Path:
    """A copy of the export whose config.json has changes."""
    hf = copy_of(hf_export, into)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **changes}))
    return hf


def import_argv(hf: Path, out: Path, *more):
    return [S("convert_hf.py"), "import", "--hf-dir", hf, "--out", out, *more]


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    """dst: the checkpoint at src with edit(ckpt) applied."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def nan_weights(ckpt):
    for tensor in ckpt["model"].values():
        tensor.fill_(float("nan"))


def metrics_keys(run: Path) -> list:
    """(step, is a training line) of every line of run's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], "loss" in record) for record in map(json.loads, lines)]


# ==== lost or corrupted data ========================================================================

@pytest.mark.parametrize("removed", [["ckpt.pt"], ["ckpt.pt", "best.pt", "loss.png"]],
                         ids=["ckpt-deleted", "only-metrics-left"])
def test_a_fresh_run_refuses_a_directory_holding_any_run_output(launcher, tmp_path, byte_data, finished_run,
                                                                removed):
    """ckpt.pt deleted to save space (best.pt, metrics.jsonl and loss.png kept), or only metrics.jsonl left: a
    fresh train.py without --force must not replace what is there."""
    run = copy_of(finished_run, tmp_path)
    for name in removed:
        (run / name).unlink()
    assert_refused(launcher, train_argv(byte_data, run), r"holds a run \(.*metrics\.jsonl.*\); pass --resume",
                   watch=[tmp_path])


def test_init_from_a_checkpoint_inside_out_dir_is_refused(launcher, tmp_path, byte_data, finished_run):
    run = copy_of(finished_run, tmp_path)
    (run / "ckpt.pt").unlink()
    assert_refused(launcher, train_argv(byte_data, run, "--init-from", run / "best.pt"),
                   r"--init-from .*best\.pt is one of the files this run writes", watch=[tmp_path])


@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_an_import_out_naming_one_of_its_inputs_is_refused_even_with_force(launcher, tmp_path, hf_export, target):
    hf = copy_of(hf_export, tmp_path)
    assert_refused(launcher, import_argv(hf, hf / target, "--force"), rf"--out .*{target} is one of the files",
                   watch=[tmp_path])


@contextmanager
def running(launcher, argv, ready):
    """argv started, and the body run once ready() holds; then argv stopped with SIGTERM, which must end it as
    train.py says (exit code 143, after saving) with no file in the run directory left behind or repeated."""
    first = launcher.start(argv)
    try:
        assert wait_for(ready, 30, first), f"exit {first.returncode}\n{first.stderr[-1500:]}"
        yield
    finally:
        first.signal(signal.SIGTERM)
        if first.wait(30) is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in first.stderr, first.stderr[-1500:]
    run = Path(argv[argv.index("--out-dir") + 1])
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temp file
    keys = metrics_keys(run)
    assert len(keys) == len(set(keys)), f"metrics.jsonl repeats lines: {keys}"


def test_a_second_train_into_a_run_directory_in_use_is_refused(launcher, tmp_path, byte_data):
    """The first run owns its directory by the time its metrics.jsonl appears."""
    argv = train_argv(byte_data, tmp_path / "out", iters=100_000)
    with running(launcher, argv, lambda: (tmp_path / "out" / "metrics.jsonl").exists()):
        assert_refused(launcher, argv, r"out is in use by another process writing a training run")


def test_a_second_resume_of_a_run_in_progress_is_refused(launcher, tmp_path, byte_data, finished_run):
    """The first --resume owns the run by the time it logs a step past the checkpoint's."""
    run = copy_of(finished_run, tmp_path)
    argv, lines = resume_argv(run, byte_data, iters=100_000), len(metrics_keys(run))
    with running(launcher, argv, lambda: len((run / "metrics.jsonl").read_text().splitlines()) > lines):
        assert_refused(launcher, argv, r"run is in use by another process writing a training run")


# ==== tracebacks ==================================================================================

def documents(directory: Path) -> Path:
    directory.mkdir()
    for i in range(3):
        (directory / f"{i}.txt").write_text(made_up_text(4000, seed=i))
    return directory


@pytest.mark.parametrize("argv,tokenizes", [
    (lambda d, data, run: train_argv(data, d / "out", "--seed", -1), False),
    (lambda d, data, run: train_argv(data, d / "out", "--seed", 2 ** 64), False),
    (lambda d, data, run: [S("compare.py"), "--data-dir", data, "--preset", "tiny", "--variants", "mla", "--seeds",
                           -1, "--max-iters", 1, "--out-dir", d / "study"], False),
    (lambda d, data, run: [S("data_prepare.py"), "--input", documents(d / "docs"), "--out-dir", d / "out",
                           "--seed", -1], True),
    (lambda d, data, run: [S("test.py"), "--ckpt", run / "best.pt", "--prompt", "a", "--max-new-tokens", 2,
                           "--device", "cpu", "--seed", 2 ** 64], True),
], ids=["train-negative", "train-2^64", "compare-negative", "prepare-negative", "sample-2^64"])
def test_a_seed_outside_0_to_2_64_is_one_line(launcher, tmp_path, byte_data, finished_run, argv, tokenizes):
    if tokenizes:
        require_gpt2_ranks()
    assert_refused(launcher, argv(tmp_path, byte_data, finished_run), r"seed", watch=[tmp_path])


@pytest.mark.parametrize("flag,value", [("--top-p", "1e-300"), ("--temperature", "1e-300")])
def test_a_sampling_value_inside_its_documented_range_samples(launcher, gpt2_vocab_checkpoint, flag, value):
    """1e-300 passes the flags' types (positive floats) but is 0 in float32: the sampler must still sample."""
    require_gpt2_ranks()
    argv = [S("test.py"), "--ckpt", gpt2_vocab_checkpoint, "--prompt", "a", "--max-new-tokens", 3, "--device",
            "cpu", flag, value]
    script = launcher.run(argv)
    assert script.returncode == 0 and "Traceback" not in script.stderr, script.stderr[-2000:]
    assert script.stdout.startswith("a") and len(script.stdout) > 1, script.stdout


DEEP = "[" * 100_000 + "1" + "]" * 100_000  # deeper than Python's json can recurse


def deep_corpus(d, data, run, hf):
    (d / "corpus.jsonl").write_text('{"text": "hi"}\n' + DEEP + "\n")
    return [S("data_prepare.py"), "--input", d / "corpus.jsonl", "--out-dir", d / "out"]


def deep_meta(d, data, run, hf):
    (copy_of(data, d) / "meta.json").write_text(DEEP)
    return train_argv(d / data.name, d / "out")


def deep_prompts(d, data, run, hf):
    (d / "p.jsonl").write_text(DEEP + "\n")
    return [S("test.py"), "--ckpt", run / "best.pt", "--prompt-file", d / "p.jsonl", "--device", "cpu"]


def deep_config(d, data, run, hf):
    (copy_of(hf, d) / "config.json").write_text(DEEP)
    return import_argv(d / hf.name, d / "x.pt")


def deep_metrics(d, data, run, hf):
    with open(copy_of(run, d) / "metrics.jsonl", "a") as f:
        f.write(DEEP + "\n")
    return resume_argv(d / run.name, data)


def deep_settings(d, data, run, hf):
    (d / "study").mkdir()
    (d / "study" / "settings.json").write_text(DEEP)
    return [S("compare.py"), "--data-dir", data, "--preset", "tiny", "--variants", "mla", "--seeds", 1,
            "--max-iters", 1, "--out-dir", d / "study"]


@pytest.mark.parametrize("case,names,tokenizes", [
    (deep_corpus, r"corpus\.jsonl:2: JSON nested too deeply", True),
    (deep_meta, r"meta\.json: JSON nested too deeply", False),
    (deep_prompts, r"p\.jsonl line 1: JSON nested too deeply", True),
    (deep_config, r"config\.json: JSON nested too deeply", False),
    (deep_metrics, r"metrics\.jsonl line \d+ is not a metrics record", False),
    (deep_settings, r"settings\.json: JSON nested too deeply", False),
], ids=["corpus-jsonl", "meta.json", "prompt-file", "config.json", "metrics.jsonl-on-resume", "settings.json"])
def test_json_nested_100000_deep_is_one_line_naming_the_file(launcher, tmp_path, byte_data, finished_run, hf_export,
                                                             case, names, tokenizes):
    if tokenizes:
        require_gpt2_ranks()
    assert_refused(launcher, case(tmp_path, byte_data, finished_run, hf_export), names, watch=[tmp_path])


def text_bytes_0(d, data, run, hf):
    data = copy_of(data, d)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["text_bytes"] = 0
    (data / "meta.json").write_text(json.dumps(meta))
    return [S("test.py"), "--ckpt", run / "best.pt", "--data-dir", data, "--device", "cpu"]


def ids_past_the_vocabulary(d, data, run, hf):
    data = copy_of(data, d)
    for split in ("train", "val"):
        ids = np.fromfile(data / f"{split}.bin", dtype=np.uint16)
        ids[::50] = 300  # meta.json and the model say vocab 256
        ids.tofile(data / f"{split}.bin")
    return train_argv(data, d / "out")


def model_a_list(d, data, run, hf):
    edited_checkpoint(run / "best.pt", d / "bad.pt", lambda ckpt: ckpt.update(model=[1, 2]))
    return [S("test.py"), "--ckpt", d / "bad.pt", "--data-dir", data, "--device", "cpu"]


def batch_size_a_string(d, data, run, hf):
    run = copy_of(run, d)
    edited_checkpoint(run / "ckpt.pt", run / "ckpt.pt", lambda ckpt: ckpt["train_config"].update(batch_size="2"))
    return resume_argv(run, data)


def rope_parameters_a_string(d, data, run, hf):
    return import_argv(edited_config(hf, d, rope_parameters="yarn"), d / "x.pt")


def metrics_not_utf8(d, data, run, hf):
    with open(copy_of(run, d) / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\n")
    return resume_argv(d / run.name, data)


def metrics_step_a_string(d, data, run, hf):
    with open(copy_of(run, d) / "metrics.jsonl", "a") as f:
        f.write('{"step": "3", "loss": 1.0}\n')
    return resume_argv(d / run.name, data)


def lone_surrogate_prompt(d, data, run, hf):
    (d / "p.jsonl").write_text('{"text": "\\ud800"}\n')
    return [S("test.py"), "--ckpt", run / "best.pt", "--prompt-file", d / "p.jsonl", "--device", "cpu"]


def nan_weights_sampling(d, data, run, hf):
    edited_checkpoint(run / "best.pt", d / "nan.pt", nan_weights)
    return [S("test.py"), "--ckpt", d / "nan.pt", "--prompt", "a", "--max-new-tokens", 2, "--device", "cpu"]


@pytest.mark.parametrize("case,names,tokenizes", [
    (text_bytes_0, r"meta\.json: splits\.val\.text_bytes must be at least 1", False),
    (ids_past_the_vocabulary, r"train\.bin holds token id 300, past the vocabulary of 256", False),
    (model_a_list, r"bad\.pt: model must map weight names to tensors", False),
    (batch_size_a_string, r"ckpt\.pt: train_config: batch_size must be an integer", False),
    (rope_parameters_a_string, r"config\.json: rope_parameters must be an object", False),
    (metrics_not_utf8, r"metrics\.jsonl is not UTF-8", False),
    (metrics_step_a_string, r"metrics\.jsonl line \d+ is not a metrics record .*integer step", False),
    (lone_surrogate_prompt, r"p\.jsonl line 1: holds a lone surrogate", True),
    (nan_weights_sampling, r"weights are not all finite", True),
], ids=["meta-text-bytes-0", "token-ids-past-vocab", "ckpt-model-a-list", "ckpt-train-config-batch-size-a-string",
        "config-rope-parameters-a-string", "metrics-not-utf8", "metrics-step-a-string", "prompt-lone-surrogate",
        "nan-weights-sampling"])
def test_a_file_field_of_the_wrong_type_or_range_is_one_line_naming_the_file_and_field(
        launcher, tmp_path, byte_data, finished_run, hf_export, case, names, tokenizes):
    if tokenizes:
        require_gpt2_ranks()
    assert_refused(launcher, case(tmp_path, byte_data, finished_run, hf_export), names, watch=[tmp_path])


# -- writes that fail part-way, and running out of memory

def test_efbig_inside_torch_save_is_one_line_and_leaves_no_temp_file(launcher, tmp_path, hf_export):
    """RLIMIT_FSIZE makes writes past 100 kB fail with EFBIG (as on FAT32): torch.save raises a RuntimeError."""
    assert_refused(launcher, import_argv(hf_export, tmp_path / "imported.pt"), r"could not write .*imported\.pt",
                   watch=[tmp_path], file_size=100_000)


def test_efbig_inside_safetensors_is_one_line_and_leaves_nothing(launcher, tmp_path, finished_run):
    argv = [S("convert_hf.py"), "export", "--ckpt", finished_run / "best.pt", "--out-dir", tmp_path / "hf"]
    assert_refused(launcher, argv, r"could not write .*hf/.*model\.safetensors.*File too large", watch=[tmp_path],
                   file_size=100_000)


def test_permission_denied_inside_torch_save_is_one_line(launcher, tmp_path, hf_export):
    """Into a directory without write permission (as root, the case gives up the capabilities that ignore it)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert_refused(launcher, import_argv(hf_export, locked / "x.pt"), r"could not write .*x\.pt.*Permission "
                       "denied", watch=[tmp_path], drop_root=True)
    finally:
        locked.chmod(0o755)


@pytest.fixture()
def small_disk(tmp_path) -> Path:
    """A 4 MiB tmpfs, a disk that can be filled; skips where one cannot be mounted."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("filling a disk needs a small tmpfs, and mounting one needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"filling a disk needs a small tmpfs: mount says {mounted.stderr.strip()!r}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_resuming_is_one_line_and_keeps_the_checkpoints(launcher, small_disk, byte_data,
                                                                          finished_run):
    """The disk has room for the log's new lines, not for a new ckpt.pt (resuming truncates metrics.jsonl to the
    checkpoint's step, so the lines a failed save leaves there may change)."""
    run = copy_of(finished_run, small_disk)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "padding").write_bytes(bytes(free - 100_000))
    kept = {name: (run / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
    assert_refused(launcher, resume_argv(run, byte_data), r"could not write .*ckpt\.pt", watch=[small_disk],
                   allowed=[r"metrics\.jsonl$"])
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_a_memory_error_without_a_message_is_one_line(launcher, tmp_path, finished_run):
    """A 64 GiB (sparse) --prompt-file: reading it raises a bare MemoryError."""
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(64 * GiB)
    argv = [S("test.py"), "--ckpt", finished_run / "best.pt", "--prompt-file", tmp_path / "huge.txt", "--device",
            "cpu"]
    assert_refused(launcher, argv, r"out of memory \(MemoryError\)", watch=[tmp_path], memory=4 * GiB)


def test_out_of_memory_is_one_line_with_the_whole_size(launcher):
    """10^7 positions pass the free-memory check (the machine's, not this process's 4 GiB limit), so torch's
    allocator runs out and its message, with the whole size, is the line."""
    argv = [S("benchmarks/bench_decode.py"), "--preset", "tiny", "--layers", 1, "--contexts", 10 ** 7, "--steps", 1,
            "--device", "cpu"]
    assert_refused(launcher, argv, r"out of memory \(.*allocate \d{9,} bytes.*\); lower --contexts",
                   memory=4 * GiB)


@pytest.mark.parametrize("argv,names", [
    (["benchmarks/bench_train.py", "--preset", "tiny", "--peak-flops", "nan"], r"--peak-flops: must be finite"),
    (["benchmarks/bench_data_prepare.py", "--size-mb", "1", "--rounds", "0"], r"--rounds: must be at least 1"),
    (["benchmarks/bench_data_prepare.py", "--size-mb", "-1", "--rounds", "1"], r"--size-mb: must be at least 1"),
], ids=["bench-train-peak-flops-nan", "bench-prepare-rounds-0", "bench-prepare-size-negative"])
def test_the_benchmarks_refuse_values_outside_their_domain_in_one_line(launcher, argv, names):
    """(An unknown flag to a benchmark is in test_cli_errors.py.) Accepted, these run for long: 10 s is a fail."""
    assert_refused(launcher, [S(argv[0]), *argv[1:]], names, timeout=10)


# ==== half-written output =========================================================================

def test_sigterm_while_preparing_data_leaves_nothing(launcher, tmp_path):
    """Signalled as soon as the first file appears in --out-dir (5 MB of text takes a while to tokenize).
    Ctrl-C at each phase is test_data.py's test_ctrl_c_leaves_nothing_behind."""
    require_gpt2_ranks()
    (tmp_path / "corpus.txt").write_text(made_up_text(5_000_000))
    before, out = snapshot(tmp_path), tmp_path / "out"
    script = signalled_once(launcher, [S("data_prepare.py"), "--input", tmp_path / "corpus.txt", "--out-dir", out,
                                       "--workers", 1], lambda: out.is_dir() and any(out.iterdir()), signal.SIGTERM)
    assert_terminated_cleanly(script)
    assert changes(before, snapshot(tmp_path)) == []


def test_sigterm_while_exporting_leaves_nothing(launcher, tmp_path):
    """A 100 MB checkpoint, so that writing model.safetensors takes a moment."""
    config = ModelConfig.from_preset("tiny", vocab_size=25_000, d_model=1024, n_head=8, ffn_hidden=512)
    save_checkpoint({"model": Transformer(config).state_dict(), "model_config": config.to_dict()},
                    tmp_path / "big.pt")
    before, out = snapshot(tmp_path), tmp_path / "hf"
    script = signalled_once(launcher, [S("convert_hf.py"), "export", "--ckpt", tmp_path / "big.pt", "--out-dir", out],
                            lambda: out.is_dir() and any(out.iterdir()), signal.SIGTERM)
    assert_terminated_cleanly(script)
    assert changes(before, snapshot(tmp_path)) == []


def test_a_run_that_fails_at_step_0_leaves_no_new_directory(launcher, tmp_path, byte_data, finished_run):
    edited_checkpoint(finished_run / "best.pt", tmp_path / "nan.pt", nan_weights)
    assert_refused(launcher, train_argv(byte_data, tmp_path / "out", "--init-from", tmp_path / "nan.pt"),
                   r"loss is nan at step 0", watch=[tmp_path])


def test_compare_refuses_a_bench_context_that_cannot_fit_before_training(launcher, tmp_path, byte_data):
    argv = [S("compare.py"), "--data-dir", byte_data, "--preset", "tiny", "--variants", "mla", "--seeds", 1,
            "--max-iters", 1, "--eval-iters", 1, "--bench-context", 10 ** 9, "--out-dir", tmp_path / "study"]
    assert_refused(launcher, argv, r"--bench-context", watch=[tmp_path], memory=4 * GiB)


# ==== hangs =======================================================================================

def test_a_named_pipe_as_config_json_is_refused_at_once(launcher, tmp_path, hf_export):
    """A FIFO blocks whoever opens it until a writer comes: refused within 10 s, not a hang."""
    hf = copy_of(hf_export, tmp_path)
    (hf / "config.json").unlink()
    os.mkfifo(hf / "config.json")
    assert_refused(launcher, import_argv(hf, tmp_path / "x.pt"), r"config\.json is not a regular file",
                   watch=[tmp_path], timeout=10)


def test_a_named_pipe_as_corpus_is_refused_at_once(launcher, tmp_path):
    require_gpt2_ranks()
    os.mkfifo(tmp_path / "pipe.txt")
    assert_refused(launcher, [S("data_prepare.py"), "--input", tmp_path / "pipe.txt", "--out-dir", tmp_path / "out"],
                   r"pipe\.txt: not a regular file", watch=[tmp_path], timeout=10)


def test_a_config_with_two_million_layers_is_refused_at_once(launcher, tmp_path, hf_export):
    """Building the model first (on the meta device, even) took more than 30 s: refused within 10 s."""
    hf = edited_config(hf_export, tmp_path, num_hidden_layers=2_000_000, first_k_dense_replace=2_000_000)
    assert_refused(launcher, import_argv(hf, tmp_path / "x.pt"), r"config\.json describes [\d,]+ weights, more than",
                   watch=[tmp_path], timeout=10, memory=3 * GiB)


# ==== accepted nonsense ===========================================================================

def test_resume_with_init_from_is_refused(launcher, tmp_path, byte_data, finished_run):
    run = copy_of(finished_run, tmp_path)
    assert_refused(launcher, [*resume_argv(run, byte_data), "--init-from", finished_run / "best.pt"],
                   r"--resume continues .*--init-from starts a new one", watch=[tmp_path])


def test_a_negative_lr_decay_iters_is_refused(launcher, tmp_path, byte_data):
    assert_refused(launcher, train_argv(byte_data, tmp_path / "out", "--lr-decay-iters", -5, iters=1),
                   r"lr_decay_iters must be positive", watch=[tmp_path])


@pytest.mark.parametrize("change,names", [
    ({"rope_interleave": "false"}, r"rope_interleave must be true or false"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings must be true or false"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 31.5}},
     r"original_max_position_embeddings must be an integer"),
], ids=["rope-interleave-string-false", "tie-word-embeddings-string-false", "original-max-position-a-float"])
def test_config_values_of_the_wrong_type_are_refused_not_coerced(launcher, tmp_path, hf_export, change, names):
    """bool("false") is True: a string where config.json wants true or false must be refused, not read as one.
    (Integer fields are test_convert_hf.py's test_import_refuses_a_config_field_of_the_wrong_type.)"""
    hf = edited_config(hf_export, tmp_path, **change)
    assert_refused(launcher, import_argv(hf, tmp_path / "x.pt"), rf"config\.json: .*{names}", watch=[tmp_path])


# ==== messages that mislead =======================================================================

def test_from_another_directory_a_relative_data_dir_is_named_with_where_it_was_looked_for(launcher, tmp_path,
                                                                                          finished_run):
    """finished_run was trained with --data-dir bytes, from workdir: from elsewhere the data is not lost, just
    not there, and the message says so and how to point at it."""
    argv = [S("test.py"), "--ckpt", finished_run / "best.pt", "--device", "cpu"]
    assert_refused(launcher, argv, rf"bytes: no such data directory \(a relative path, from {tmp_path}\).*--data-dir",
                   cwd=tmp_path)


def test_a_full_stdout_is_one_line_naming_standard_output(launcher, byte_data, finished_run):
    argv = [S("test.py"), "--ckpt", finished_run / "best.pt", "--data-dir", byte_data, "--device", "cpu"]
    assert_refused(launcher, argv, r"^error: standard output: No space left on device$", stdout="/dev/full")


def test_compare_after_ctrl_c_says_to_run_the_same_command_again(launcher, tmp_path, byte_data):
    """Not 'continue with --resume', train.py's advice: compare.py has no such flag."""
    study = tmp_path / "study"
    argv = [S("compare.py"), "--data-dir", byte_data, "--preset", "tiny", "--variants", "mla", "--seeds", 1,
            "--max-iters", 200, "--eval-interval", 1, "--eval-iters", 1, "--bench-context", 16, "--out-dir", study]
    script = signalled_once(launcher, argv, lambda: (study / "mla-seed1" / "ckpt.pt").exists(), signal.SIGINT)
    said = script.stdout + script.stderr
    assert script.returncode == 130 and "Traceback" not in said, said[-2000:]
    assert "run the same command again to continue" in said and "--resume" not in said, said[-2000:]


# ==== the newcomer's path =========================================================================

def test_the_readmes_test_command_names_the_corpus_variable_conftest_reads(launcher, tmp_path):
    readme = (REPO / "README.md").read_text().splitlines()
    assert any("pytest" in line and "MLA_TINY_SHAKESPEARE=" in line for line in readme)
    (tmp_path / "where.py").write_text(f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
                                       "import conftest\nprint(conftest.SHAKESPEARE)\n")
    script = launcher.run([tmp_path / "where.py"], env={"MLA_TINY_SHAKESPEARE": str(tmp_path / "input.txt")})
    assert script.returncode == 0 and script.stdout == f"{tmp_path / 'input.txt'}\n", script.stderr[-2000:]


def test_the_readme_installs_the_cpu_wheel_before_requirements():
    lines = (REPO / "README.md").read_text().splitlines()
    cpu = next(i for i, line in enumerate(lines) if "download.pytorch.org/whl/cpu" in line)
    requirements = next(i for i, line in enumerate(lines) if "pip install -r requirements.txt" in line)
    assert cpu < requirements, "requirements.txt (an unpinned torch: the CUDA build) comes before the CPU wheel"


@pytest.mark.parametrize("path", ["hf_model/config.json", "imported.pt"])
def test_gitignore_covers_the_readmes_outputs(path):
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", path]).returncode == 0


def test_an_export_follows_the_umask(launcher, tmp_path, finished_run):
    """safetensors writes 0600 whatever the umask; under umask 027 every file must be 0640."""
    script = launcher.run([S("convert_hf.py"), "export", "--ckpt", finished_run / "best.pt", "--out-dir",
                           tmp_path / "hf"], umask=0o027)
    assert script.returncode == 0, script.stderr[-2000:]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors"} <= modes.keys() and set(modes.values()) == {"0o640"}, modes
