"""Tensor-parallel workers: ranks 1..N-1 in spawned processes, driven by rank 0.

Rank 0 (the user's process) sends each call through a shared-memory buffer and wakes
the workers with one semaphore each; every worker acknowledges (another semaphore) that
it has copied the message out before rank 0 may write the next one. NOTE: semaphores,
not Events: Event.set() waits for its sleepers to wake, forever if one is stopped. The step's tensors travel in the
message; the model's collectives (NCCL on CUDA, gloo on CPU) then run in lockstep.

Rank 0 hosts the rendezvous store and waits for every worker to join it while polling
that they live, so a worker that dies at start-up (a script without a `__main__` guard)
is reported in a second. A step that outlives `Config.step_timeout_s` (a stopped or
stuck worker) is an error too; after either, the group refuses work and is killed.
"""
import multiprocessing as mp
import os
import pickle
import signal
import struct
import time
import uuid
from datetime import timedelta
from multiprocessing.shared_memory import SharedMemory

import torch
import torch.distributed as dist

from nanovllm.config import Config, ModelConfig

HEADER = struct.Struct("<Q")          # payload length
INITIAL_BUFFER_BYTES = 1 << 22         # grows on demand (a resize message travels first)
POLL_SECONDS = 0.5                     # how often a waiting side checks that its peer lives
START_TIMEOUT_SECONDS = 600            # the store's wait for a peer's address during the rendezvous
JOINED_KEY = "nanovllm_joined"         # each worker adds 1 once connected to rank 0's store
FAILED_KEY = "nanovllm_failed_rank_"   # + rank: why that worker could not start (one line)
EXIT_VISIBLE_SECONDS = 2              # after a failed collective, how long a dying worker may take to show
KILL_GRACE_SECONDS = 30                # a healthy worker's time to leave after 'exit'
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerDied(RuntimeError):
    pass


def _write(shm: SharedMemory, payload: bytes) -> None:
    shm.buf[:HEADER.size] = HEADER.pack(len(payload))
    shm.buf[HEADER.size:HEADER.size + len(payload)] = payload


def _read(shm: SharedMemory) -> bytes:
    (n,) = HEADER.unpack(bytes(shm.buf[:HEADER.size]))
    return bytes(shm.buf[HEADER.size:HEADER.size + n])


class WorkerGroup:
    """Rank 0's handle on the worker processes."""

    def __init__(self, config: Config, model_config: ModelConfig, max_model_len: int):
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel LLM already runs in this process; call its exit() first")
        self.world_size, self.step_timeout_s = config.tensor_parallel_size, config.step_timeout_s
        self.failure: str | None = None   # why the group may not run another step
        self.procs, self.last_call = [], time.monotonic()
        # NOTE: port 0: the OS picks a free port, with no race between choosing and binding it
        self.store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=START_TIMEOUT_SECONDS))
        self.shm = SharedMemory(create=True, size=INITIAL_BUFFER_BYTES,
                                name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        try:
            self._start(config, model_config, max_model_len)
        except BaseException:  # e.g. spawning from a module being imported by a spawned child
            self.kill()
            raise

    def _start(self, config: Config, model_config: ModelConfig, max_model_len: int) -> None:
        ctx = mp.get_context("spawn")
        self.wake = [ctx.Semaphore(0) for _ in range(self.world_size - 1)]
        self.acked = [ctx.Semaphore(1) for _ in range(self.world_size - 1)]  # nothing sent yet: "acknowledged"
        os.environ.update(NCCL_SAFE_ENV)  # inherited by the spawned workers too
        self.procs = [
            ctx.Process(target=worker_main, name=f"nanovllm-tp{rank}", daemon=True,
                        args=(config, model_config, max_model_len, rank, self.store.port, self.shm.name,
                              self.wake[rank - 1], self.acked[rank - 1]))
            for rank in range(1, self.world_size)
        ]
        for p in self.procs:
            p.start()

    @property
    def died(self) -> bool:
        """A worker is gone or stuck: pending collectives can never finish (abort them)."""
        return self.failure is not None

    def rendezvous(self) -> dist.Store:
        """Wait until every worker has joined rank 0's store; a worker that exits first raises."""
        while self.store.add(JOINED_KEY, 0) < self.world_size - 1:
            self.check_alive()
            time.sleep(0.05)
        return self.store

    def check_alive(self) -> None:
        if self.failure is not None:
            raise WorkerDied(self.failure)
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                key = f"{FAILED_KEY}{rank}"
                self.failure = (f"tensor-parallel worker rank {rank} did not start: {self.store.get(key).decode()}"
                                if self.store.check([key]) else
                                f"tensor-parallel worker rank {rank} died (exit code {p.exitcode}); if it died "
                                f"at start-up, check that your script creates LLM under `if __name__ == '__main__':`")
                raise WorkerDied(self.failure)

    def check_step(self) -> None:
        """check_alive, and the step watchdog: the last call may not run past step_timeout_s."""
        self.check_alive()
        if time.monotonic() - self.last_call > self.step_timeout_s:
            self.failure = (f"a tensor-parallel step ran past step_timeout_s={self.step_timeout_s:g} s: a worker is "
                            f"stuck or stopped (a larger step_timeout_s helps only if it is merely slow)")
            raise WorkerDied(self.failure)

    def explain(self) -> WorkerDied | None:
        """After a step's collective failed: the worker failure behind it, if there is one.
        NOTE: a killed worker's sockets close a moment before its exit code shows: wait a little."""
        deadline = time.monotonic() + EXIT_VISIBLE_SECONDS
        while True:
            try:
                self.check_step()
            except WorkerDied as e:
                return e
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_SECONDS / 10)

    def call(self, method: str, *args) -> None:
        """Ask every worker to run `ModelRunner.<method>(*args)`."""
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if HEADER.size + len(payload) > self.shm.size:
            self._resize(HEADER.size + len(payload))
        self._send(payload)

    def _wait_acked(self, keep: bool = False) -> None:
        """Wait until every worker has copied the last message out; `keep`: leave that
        acknowledgement for the next send to consume."""
        for acked in self.acked:
            while not acked.acquire(timeout=POLL_SECONDS):
                self.check_step()
            if keep:
                acked.release()

    def _send(self, payload: bytes) -> None:
        self._wait_acked()  # the last message has been copied out by everyone
        _write(self.shm, payload)
        self.last_call = time.monotonic()
        for wake in self.wake:
            wake.release()

    def _resize(self, needed: int) -> None:
        new = SharedMemory(create=True, size=max(needed, 2 * self.shm.size),
                           name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        self._send(pickle.dumps(("_resize", (new.name,))))
        self._wait_acked(keep=True)  # everyone has switched before the old buffer goes
        self._unlink()
        self.shm = new

    def _unlink(self) -> None:
        self.shm.close()
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass

    def shutdown(self) -> None:
        """Stop the workers: ask healthy ones to leave, kill the rest; free the shared memory."""
        healthy = self.failure is None and all(p.exitcode is None for p in self.procs)
        if healthy:
            try:
                self.call("exit")
            except WorkerDied:
                healthy = False
        self.kill(grace_s=KILL_GRACE_SECONDS if healthy else 0)

    def kill(self, grace_s: float = 0) -> None:
        """Stop the workers after `grace_s` (0: at once) and free the shared memory."""
        for p in self.procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=grace_s)
            if p.is_alive():
                p.kill()  # NOTE: SIGKILL ends a stopped (SIGSTOP) process too
                p.join()
        self._unlink()


def worker_main(config: Config, model_config: ModelConfig, max_model_len: int, rank: int, store_port: int,
                shm_name: str, wake, acked) -> None:
    """A worker's life: build its ModelRunner, then run rank 0's calls until 'exit'."""
    from nanovllm.engine.model_runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    device = torch.device("cuda", rank) if config.resolved_device.type == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    store = dist.TCPStore("127.0.0.1", store_port, config.tensor_parallel_size, is_master=False,
                          timeout=timedelta(seconds=START_TIMEOUT_SECONDS))
    store.add(JOINED_KEY, 1)
    try:
        runner = ModelRunner(config, model_config, max_model_len, device, rank, store)
    except Exception as e:  # NOTE: told to rank 0 as one line, not printed here as a second traceback
        store.set(f"{FAILED_KEY}{rank}", f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None
    shm = SharedMemory(name=shm_name)
    parent = mp.parent_process()
    try:
        while True:
            while not wake.acquire(timeout=POLL_SECONDS):
                if parent is not None and not parent.is_alive():
                    return
            method, args = pickle.loads(_read(shm))
            if method == "_resize":
                shm.close()
                shm = SharedMemory(name=args[0])
                acked.release()
                continue
            acked.release()
            if method == "exit":
                return
            getattr(runner, method)(*args)
    finally:
        shm.close()
        runner.exit()
