"""Training over several processes (gloo, 2 CPU processes under torchrun): DDP and FSDP2
follow one process, a killed DDP run resumes bit-equal, checkpoints cross between FSDP
and one process, the ranks agree on resuming and on stopping, and they split evaluation and
k-means initialisation between them.

The runs that are compared with one process train in float64. In float32 the two differ
at first by reduction order (about 1e-7), and a tie between two codes that this flips
now and then sends a code (and, with dead-code replacement, the codes revived after it)
a different way; float64 keeps every decision equal, so any difference is a real one.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from scripts.dist_shards import eval_setup, kmeans_cases
from scripts.work_counter import counting_work
from test_training import config, final_weights

from codelens import CodebookConfig
from codelens.training import state as train_state
from codelens.training.init import kmeans
from codelens.training.parallel import resolve_device
from codelens.training.trainer import evaluate, train

SCRIPT = Path(__file__).parent / "scripts" / "dist_run.py"
SHARDS_SCRIPT = Path(__file__).parent / "scripts" / "dist_shards.py"
# 20 steps of 384 tokens; the dead-code window closes every 3 steps, with dead codes to revive.
# gloo on the CPU, also where a GPU is present (the ranks would otherwise each want one).
RUN = dict(
    device="cpu",
    steps=20,
    codebook={"n_codes": 64, "k": 1},
    dead_code_window=1000,
    eval_every=5,
    checkpoint_every=5,
    keep_checkpoints=4,
)
EXACT = 1e-9  # float64: measured differences are about 1e-14
EVAL_EXACT = 1e-12  # float64 evaluation figures, relative (explained variance can be -185)


def torchrun(
    cfg, *flags: str, where: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run ``cfg`` in 2 gloo processes, its JSON file in ``where`` (by default beside its
    run_dir); returns the finished launcher, its output captured."""
    where = where or Path(cfg.run_dir).parent
    cfg_file = where / f"{Path(cfg.run_dir).name}.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    return launch(SCRIPT, str(cfg_file), *flags, cwd=cfg_file.parent, timeout=timeout)


def launch(script: Path, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` in 2 gloo processes under torchrun, killed (launcher and ranks) when
    it runs past ``timeout`` seconds."""
    with socket.socket() as probe:  # a free port: a fixed one can collide and hang a rank
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(script),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", **{TAG: f"{os.getpid()}-{port}"})
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,  # on a timeout, the launcher and its ranks go together
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_tagged(env[TAG])  # the ranks run in sessions of their own
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


TAG = "CODELENS_TEST_LAUNCH"


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries this launch's tag (its ranks)."""
    wanted = f"{TAG}={tag}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-4000:]


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def train_float64(cfg) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        train(cfg, progress=False)
    finally:
        torch.set_default_dtype(torch.float32)


def resumable_copy(run_dir: Path, to: Path, step: int) -> Path:
    """A copy of ``run_dir`` as a run killed after the checkpoint of ``step`` left it."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(to / "final")
    for later in train_state.checkpoint_dirs(to):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    return to


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The one-process run every multi-process run is compared with; the rows it ran in
    k-means initialisation and evaluation are in work.json beside it."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    with counting_work() as work:
        train_float64(config(run_dir, **RUN))
    (run_dir.parent / "work.json").write_text(json.dumps(work))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert any(x.get("dead", 0) > 0 for x in lines), "no dead codes: nothing would be revived"
    return run_dir


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    ok(torchrun(config(run_dir, **RUN), "--float64", "--report"))
    return run_dir


def test_ddp_matches_one_process_with_dead_code_replacement(single, ddp):
    assert_close(final_weights(single), final_weights(ddp), atol=EXACT)


@pytest.mark.slow
def test_killed_ddp_run_resumes_bit_equal(ddp, tmp_path):
    run = config(tmp_path / "run", **RUN)
    killed = torchrun(run, "--float64", "--kill-at", "12")
    assert killed.returncode != 0
    assert train_state.checkpoint_dirs(tmp_path / "run")[-1].name == "step-00000010"
    ok(torchrun(run, "--float64"))
    a, b = final_weights(ddp), final_weights(tmp_path / "run")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    ok(torchrun(config(run_dir, **RUN, parallel="fsdp"), "--float64", "--report"))
    return run_dir


def test_fsdp_matches_one_process_with_dead_code_replacement(single, fsdp):
    assert_close(final_weights(single), final_weights(fsdp), atol=EXACT)


@pytest.mark.slow
def test_checkpoints_cross_between_fsdp_and_one_process(single, fsdp, tmp_path):
    # one process's step-10 checkpoint, resumed sharded
    resumed = resumable_copy(single, tmp_path / "to_fsdp", 10)
    ok(torchrun(config(resumed, **RUN, parallel="fsdp"), "--float64"))
    assert_close(final_weights(single), final_weights(resumed), atol=EXACT)
    # the sharded run's step-10 checkpoint, resumed in one process
    back = resumable_copy(fsdp, tmp_path / "from_fsdp", 10)
    train_float64(config(back, **RUN))
    assert_close(final_weights(single), final_weights(back), atol=EXACT)


def evaluations(run_dir: Path) -> list[dict]:
    lines = map(json.loads, (run_dir / "metrics.jsonl").open())
    return [{k: v for k, v in x.items() if k != "split"} for x in lines if x["split"] == "eval"]


def check_shared_work(single: Path, run_dir: Path) -> None:
    """Each rank ran half the rows of one process's k-means initialisation and of its
    evaluations, and every rank got one process's evaluation figures."""
    one = json.loads((single.parent / "work.json").read_text())
    reports = [json.loads((run_dir.parent / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rows > 0 and rows % 2 == 0 for rows in one.values()), one
    work = {phase: [report["work"][phase] for report in reports] for phase in one}
    assert work == {phase: [rows // 2] * 2 for phase, rows in one.items()}
    expected = json.loads((single / "final_eval.json").read_text())
    for rank, report in enumerate(reports):
        assert report["final_eval"].keys() == expected.keys(), rank
        for key, value in expected.items():
            assert report["final_eval"][key] == pytest.approx(
                value, rel=EVAL_EXACT, abs=EVAL_EXACT
            ), key
    logged, logged_one = evaluations(run_dir), evaluations(single)
    assert [x["step"] for x in logged] == [x["step"] for x in logged_one] == [5, 10, 15, 20]
    for line, line_one in zip(logged, logged_one, strict=True):
        assert line == pytest.approx(line_one, rel=EVAL_EXACT, abs=EVAL_EXACT)


def test_ddp_ranks_share_evaluation_and_kmeans_init(single, ddp):
    check_shared_work(single, ddp)


def test_fsdp_ranks_share_evaluation_and_kmeans_init(single, fsdp):
    check_shared_work(single, fsdp)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_process_group_and_its_threads_end_with_train(mode, request):
    """Once `train` returns, nothing holds the process group it started, so gloo's worker
    threads have been joined: left running, one of them could still be releasing a
    tensor when the interpreter exits, which aborted a finished FSDP run now and then.
    The model returned is whole, also under FSDP."""
    run_dir = request.getfixturevalue(mode)
    for rank in (0, 1):
        report = json.loads((run_dir.parent / f"report-rank{rank}.json").read_text())
        gloo = [name for name in report["threads"] if "gloo" in name]
        assert not gloo, (rank, report["threads"])
        assert not report["sharded"], rank


def test_sharded_kmeans_and_evaluation_equal_one_process(tmp_path):
    """`kmeans` on unequal shares of the samples (random and k-means++ starts, chunked
    assignment, empty clusters, fewer samples than clusters) and `evaluate` of each
    rank's rows, called directly: every rank gets one process's result."""
    ok(launch(SHARDS_SCRIPT, str(tmp_path), cwd=tmp_path, timeout=180))
    ranks = [load_file(tmp_path / f"kmeans-rank{r}.safetensors") for r in (0, 1)]
    for name, (x, kwargs) in kmeans_cases().items():
        one = kmeans(x, generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], one, atol=1e-10, rtol=0, msg=name)
    figures = [json.loads((tmp_path / f"eval-rank{r}.json").read_text()) for r in (0, 1)]
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, EVAL_EXACT)):
        model, batches = eval_setup(dtype)
        one = evaluate(model, batches)
        for rank in (0, 1):
            got = figures[rank][str(dtype)]
            assert got.keys() == one.keys()
            assert got == pytest.approx(one, rel=tolerance, abs=tolerance), (dtype, rank)


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    done = torchrun(config(tmp_path / "run", steps=8, device="cpu"), "--nan-at", "3")
    ok(done)
    for rank in (0, 1):
        assert (tmp_path / f"nonfinite-rank{rank}.txt").read_text() == "3", done.stderr[-3000:]


def test_rank_0_decides_whether_to_resume(tmp_path):
    # rank 0's run_dir holds a checkpoint that rank 1, on a disk of its own, cannot see
    first = config(tmp_path / "rank0" / "run", steps=4, checkpoint_every=2, device="cpu")
    train(first, progress=False)
    later = config("run", steps=8, device="cpu")
    done = torchrun(later, "--own-dir", where=tmp_path, timeout=120)
    assert done.returncode != 0
    assert "rank 0 resumes from run/checkpoints/step-00000004, which this process (rank 1)" in (
        done.stderr
    )
    assert "run_dir must be on a filesystem every process shares" in done.stderr


def test_evaluation_is_not_counted_as_code_usage(tmp_path):
    train(config(tmp_path / "run", steps=10, eval_every=1), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    train_lines = [x for x in lines if x["split"] == "train"]
    for line in train_lines:  # 5 steps of 16 sequences of 24 tokens, no evaluation tokens
        assert line["blocks.0.hook_mlp_out/tokens"] == 5 * 16 * 24


@pytest.mark.parametrize("spec", ["auto", "cuda"])
def test_each_rank_takes_the_gpu_of_its_local_rank(spec):
    for local_rank in (0, 1, 3):
        device = resolve_device(spec, world=4, local_rank=local_rank, cuda_available=True)
        assert device == torch.device("cuda", local_rank)
    assert resolve_device("cuda:2", world=1, local_rank=0, cuda_available=True).index == 2
    assert resolve_device("auto", world=4, local_rank=1, cuda_available=False).type == "cpu"


def test_one_gpu_for_several_processes_is_an_error():
    with pytest.raises(ValueError, match="'cuda:0' puts all 2 processes on one GPU"):
        resolve_device("cuda:0", world=2, local_rank=1, cuda_available=True)


def test_cuda_random_state_is_saved_from_and_restored_to_the_training_gpu(tmp_path, monkeypatch):
    model = tiny_model("gpt2", CodebookConfig(n_codes=8, sites=("mlp",)))
    optimizer = torch.optim.AdamW(model.parameters())
    calls = []

    def get_rng_state(device="cuda"):
        calls.append(("get", str(device)))
        return torch.zeros(8, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", str(device)))
    )
    gpu = torch.device("cuda", 1)  # rank 1's GPU; the current device would be cuda:0
    path = train_state.save_state(tmp_path, 3, model, optimizer, {}, keep=1, cuda_device=gpu)
    train_state.load_state(path, model, optimizer, cuda_device=gpu)
    assert calls == [("get", "cuda:1"), ("set", "cuda:1")]
