"""Tensor-parallel lifecycles on CPU (gloo), each scenario in a subprocess with a timeout,
so a regression fails instead of hanging: a failed constructor leaves the process as it
found it; a one-rank engine beside a TP engine never touches its process group; a second
TP engine is refused at once; a stopped worker trips the step watchdog; a worker that dies
before the rendezvous is reported in seconds with the `__main__` hint."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.e2e.test_bad_input import _rewrite_weights
from tests.helpers import needs_two_ranks

pytestmark = needs_two_ranks

# one subprocess runs every scenario that needs a healthy interpreter, in order
SCENARIOS = textwrap.dedent('''
    import multiprocessing, os, signal, sys, time
    import torch.distributed as dist
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine.worker import WorkerDied

    ENGINE = dict(kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=16)
    GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    PROMPTS = [[5, 6, 7], [100, 101]]

    def our_shm():
        return [f for f in os.listdir("/dev/shm") if f.startswith(f"nanovllm_{os.getpid()}_")]

    def clean():
        return not dist.is_initialized() and not our_shm() and not multiprocessing.active_children()

    def outputs(llm):
        return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]

    if __name__ == "__main__":
        good, bad_shape = sys.argv[1:3]
        no_kv_memory = {**ENGINE, "num_kvcache_blocks": -1, "cpu_kvcache_bytes": 1, "gpu_memory_utilization": 1e-3}
        for path, kwargs, error in [(bad_shape, ENGINE, ValueError), (good, no_kv_memory, RuntimeError)]:
            try:
                LLM(path, tensor_parallel_size=2, **kwargs)
                raise AssertionError("the constructor should have failed")
            except error as e:
                print("failed as it should:", e)
            assert clean(), "a failed constructor left a process group, shared memory or a worker"
        expected = outputs(LLM(good, **ENGINE))

        tp2 = LLM(good, tensor_parallel_size=2, step_timeout_s=4, **ENGINE)
        beside = LLM(good, **ENGINE)  # NOTE: it used to hang in tp2's all_reduce
        assert outputs(beside) == expected and outputs(tp2) == expected
        start = time.monotonic()
        try:
            LLM(good, tensor_parallel_size=2, **ENGINE)
            raise AssertionError("a second TP engine should be refused")
        except RuntimeError as e:
            assert "already runs" in str(e) and time.monotonic() - start < 5, (e, time.monotonic() - start)
        assert outputs(tp2) == expected  # unharmed by the refusal

        worker = tp2.workers.procs[0]
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        try:
            outputs(tp2)
            raise AssertionError("a stopped worker should trip the watchdog")
        except WorkerDied as e:
            elapsed = time.monotonic() - start
            assert "step_timeout_s=4" in str(e) and elapsed < 30, (e, elapsed)
            print(f"watchdog after {elapsed:.1f} s:", e)
        tp2.exit()
        assert not worker.is_alive() and clean()
        assert outputs(beside) == expected
        for engine in (tp2, beside):
            engine.exit()
            try:
                outputs(engine)
                raise AssertionError("generate after exit() should fail")
            except RuntimeError as e:
                assert "exit() was called" in str(e), e
        print("ALL OK")
''')

# the classic mistake: spawned workers re-import the script, which makes another LLM
NO_MAIN_GUARD = textwrap.dedent('''
    import sys
    from nanovllm import LLM
    LLM(sys.argv[1], tensor_parallel_size=2, kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=16)
''')


def run_script(tmp_path, source: str, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; output so far:\n{e.stdout}\n{e.stderr}")
    return proc, time.monotonic() - start


@pytest.fixture
def bad_shape_checkpoint(checkpoint, tmp_path) -> str:
    import shutil
    import torch
    path = shutil.copytree(checkpoint("qwen3"), tmp_path / "bad")
    _rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.randn(65)}))
    return str(path)


def test_tp_lifecycles(checkpoint, bad_shape_checkpoint, tmp_path):
    proc, _ = run_script(tmp_path, SCENARIOS, checkpoint("qwen3"), bad_shape_checkpoint, timeout=300)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout + proc.stderr
    assert "leaked shared_memory" not in proc.stderr, proc.stderr


def test_worker_dying_before_the_rendezvous_is_reported_in_seconds(checkpoint, tmp_path):
    proc, elapsed = run_script(tmp_path, NO_MAIN_GUARD, checkpoint("qwen3"), timeout=120)
    assert proc.returncode != 0
    assert "WorkerDied" in proc.stderr and "if __name__ == '__main__':" in proc.stderr, proc.stderr
    assert "leaked shared_memory" not in proc.stderr, proc.stderr
    assert elapsed < 60, elapsed  # the worker's own start-up; it used to be the store's 30 minutes


def test_a_worker_that_cannot_start_tells_rank_0_in_one_line(checkpoint, monkeypatch):
    """Its reason reaches rank 0's WorkerDied, and it exits without a traceback of its own (which,
    printed beside rank 0's one-line error, told the same story twice). Run in this process with
    the runner failing as a bad checkpoint makes it fail: which rank fails first is a race."""
    from datetime import timedelta
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from nanovllm.config import Config, ModelConfig
    from nanovllm.engine import model_runner, worker

    def broken_runner(*args):
        raise ValueError("checkpoint tensor 'x': shape mismatch")
    monkeypatch.setattr(model_runner, "ModelRunner", broken_runner)
    config = Config(checkpoint("qwen3"), tensor_parallel_size=2)
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    threads = torch.get_num_threads()  # NOTE: a CPU worker sets its share of the cores
    with pytest.raises(SystemExit) as e:
        try:
            worker.worker_main(config, ModelConfig.from_dir(config.model), 128, 1, store.port, "unused", None, None)
        finally:
            torch.set_num_threads(threads)
    assert e.value.code == 1 and e.value.__suppress_context__  # multiprocessing prints no traceback for it
    group = SimpleNamespace(failure=None, store=store, procs=[SimpleNamespace(exitcode=1)])
    with pytest.raises(worker.WorkerDied, match=r"^tensor-parallel worker rank 1 did not start: ValueError: "
                                                 r"checkpoint tensor 'x': shape mismatch$"):
        worker.WorkerGroup.check_alive(group)
