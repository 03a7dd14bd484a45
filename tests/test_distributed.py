"""Training in several processes (torchrun, gloo on CPU): the same heads as one process with the
same global batch, and exact resume after a SIGKILL of the whole run."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from graft import checkpoint as ckpt
from graft.config import GraftError
from graft.distributed import Dist
from graft.model import add_heads, load
from graft.train import _check_sharding, train

from conftest import ROOT

OPTS = {"seq_len": 16, "lr": 3e-3, "warmup": 2, "eval_every": 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(graft_dir, data, *args, nproc=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "graft", "train", str(graft_dir), "--data", data,
           "--device", "cpu", *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def succeeded(p) -> str:
    """Wait for a launched run; it must exit 0. Returns its standard output."""
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of
    their own, so killing its process group does not reach them)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30  # dead, or zombies nobody reaps yet
    while time.time() < deadline and any(ckpt._alive(p) for p in tree):
        time.sleep(0.01)


def flags(opts):
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v)]


def heads_of(d):
    return load(str(d), device="cpu").heads.state_dict()


def test_two_processes_train_the_heads_one_process_trains(tiny_dirs, tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=str(d), device="cpu")
    train(str(one), tiny_data, {**OPTS, "max_steps": 8, "batch_size": 8, "save_every": 4}, device="cpu",
          progress=False)
    p = torchrun(two, tiny_data, *flags({**OPTS, "max_steps": 8, "batch_size": 4, "save_every": 4}))
    out = succeeded(p)
    assert "done: 8 steps" in out
    a, b = heads_of(one), heads_of(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert load(str(two), device="cpu").config.training["processes"] == 2


def test_two_processes_resume_exactly_after_sigkill(tiny_dirs, tiny_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=str(d), device="cpu")
    opts = flags({**OPTS, "max_steps": 200, "batch_size": 2, "save_every": 5})
    p = torchrun(ref, tiny_data, *opts)
    succeeded(p)
    p = torchrun(run, tiny_data, *opts)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if ckpt.load_checkpoint(str(run))[0] >= 10:
                break
        except GraftError:
            pass
        time.sleep(0.02)
    kill_tree(p.pid)  # the launcher and both workers, wherever they are
    p.communicate()
    assert ckpt.load_checkpoint(str(run))[0] < 200  # killed mid-run
    p = torchrun(run, tiny_data, "--resume")
    succeeded(p)
    a, b = heads_of(ref), heads_of(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_data_in_two_processes_writes_one_ordered_file(tiny_dirs, tmp_path):
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}" + " again" * (i % 3)}) + "\n" for i in range(7)))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["--prompts", str(prompts), "--max-new-tokens", "5", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "graft", "distill-data", tiny_dirs["llama"], "--out", str(one), *common],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), "-m", "graft", "distill-data",
                        tiny_dirs["llama"], "--out", str(two), *common], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert two.read_text() == one.read_text()
    assert not list(tmp_path.glob("two.jsonl.part-*"))


def test_accelerate_launch_with_a_sharded_backbone_trains_what_torchrun_trains(tiny_dirs, tiny_data, tmp_path):
    """`accelerate launch` (its torchrun-based launcher; gloo on CPU) with the backbone's layers
    sharded over the two processes (FSDP2) gives the heads that torchrun gives with the backbone
    whole in each process; evaluation in between runs the same number of batches everywhere."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    for d in (plain, sharded):
        add_heads(tiny_dirs["llama"], heads="eagle", num_heads=2, out=str(d), device="cpu")
    opts = flags({**OPTS, "max_steps": 6, "batch_size": 4, "eval_every": 3})
    p = torchrun(plain, tiny_data, *opts)
    succeeded(p)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "graft", "train", str(sharded), "--data", tiny_data, "--device", "cpu",
           "--shard-backbone", *[str(a) for a in opts]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: 6 steps") == 1  # one summary, from rank 0
    training = load(str(sharded), device="cpu").config.training
    assert training["processes"] == 2 and training["sharded_backbone"]
    a, b = heads_of(plain), heads_of(sharded)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_shard_backbone_refusals(tiny_dirs, tiny_data, tmp_path):
    g = tmp_path / "g"
    add_heads(tiny_dirs["llama"], heads="medusa", num_heads=2, out=str(g), device="cpu")
    with pytest.raises(GraftError, match="several processes: launch with `torchrun"):
        train(str(g), tiny_data, {**OPTS, "max_steps": 1}, device="cpu", progress=False, shard_backbone=True)
    with pytest.raises(GraftError, match="does not take a 4-bit backbone"):
        _check_sharding(Dist(0, 2), True, None)
    with pytest.raises(GraftError, match="trains no LoRA"):
        _check_sharding(Dist(0, 2), False, 8)
