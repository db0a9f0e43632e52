"""Tensor-parallel workers: ranks 1..N-1 in spawned processes, driven by rank 0.

Rank 0 (the user's process) sends each call through a shared-memory buffer and wakes
the workers with one event each; every worker acknowledges that it has copied the
message out before rank 0 may write the next one. The step's tensors travel in the
message; the model's collectives (NCCL on CUDA, gloo on CPU) then run in lockstep.
"""
import multiprocessing as mp
import os
import pickle
import signal
import socket
import struct
import uuid
from multiprocessing.shared_memory import SharedMemory

import torch

from nanovllm.config import Config, ModelConfig

HEADER = struct.Struct("<Q")          # payload length
INITIAL_BUFFER_BYTES = 1 << 22         # grows on demand (a resize message travels first)
POLL_SECONDS = 0.5                     # how often a waiting side checks that its peer lives
START_TIMEOUT_SECONDS = 600            # weight loading and graph capture of a large model
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.world_size = config.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.shm = SharedMemory(create=True, size=INITIAL_BUFFER_BYTES,
                                name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        self.wake = [ctx.Event() for _ in range(self.world_size - 1)]
        self.acked = [ctx.Event() for _ in range(self.world_size - 1)]
        for e in self.acked:
            e.set()
        os.environ.update(NCCL_SAFE_ENV)  # inherited by the spawned workers too
        self.procs = [
            ctx.Process(target=worker_main, name=f"nanovllm-tp{rank}", daemon=True,
                        args=(config, model_config, max_model_len, rank, self.init_method, self.shm.name,
                              self.wake[rank - 1], self.acked[rank - 1]))
            for rank in range(1, self.world_size)
        ]
        for p in self.procs:
            p.start()
        self.died = False   # a worker exited while rank 0 still needed it

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                self.died = True
                raise WorkerDied(f"tensor-parallel worker rank {rank} died (exit code {p.exitcode}); if it died "
                                 f"at start-up, check that your script creates LLM under `if __name__ == '__main__':`")

    def call(self, method: str, *args) -> None:
        """Ask every worker to run `ModelRunner.<method>(*args)`."""
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if HEADER.size + len(payload) > self.shm.size:
            self._resize(HEADER.size + len(payload))
        self._send(payload)

    def _send(self, payload: bytes) -> None:
        for e in self.acked:  # the last message has been copied out by everyone
            while not e.wait(POLL_SECONDS):
                self.check_alive()
            e.clear()
        _write(self.shm, payload)
        for e in self.wake:
            e.set()

    def _resize(self, needed: int) -> None:
        new = SharedMemory(create=True, size=max(needed, 2 * self.shm.size),
                           name=f"nanovllm_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        self._send(pickle.dumps(("_resize", (new.name,))))
        for e in self.acked:  # everyone has switched before the old buffer goes
            while not e.wait(POLL_SECONDS):
                self.check_alive()
        self._unlink()
        self.shm = new

    def _unlink(self) -> None:
        self.shm.close()
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass

    def shutdown(self) -> None:
        try:
            if all(p.exitcode is None for p in self.procs):
                self.call("exit")
        except WorkerDied:
            pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        self._unlink()


def worker_main(config: Config, model_config: ModelConfig, max_model_len: int, rank: int, init_method: str,
                shm_name: str, wake, acked) -> None:
    """A worker's life: build its ModelRunner, then run rank 0's calls until 'exit'."""
    from nanovllm.engine.model_runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    device = torch.device("cuda", rank) if config.resolved_device.type == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    runner = ModelRunner(config, model_config, max_model_len, device, rank, init_method)
    shm = SharedMemory(name=shm_name)
    parent = mp.parent_process()
    try:
        while True:
            while not wake.wait(POLL_SECONDS):
                if parent is not None and not parent.is_alive():
                    return
            wake.clear()
            method, args = pickle.loads(_read(shm))
            if method == "_resize":
                shm.close()
                shm = SharedMemory(name=args[0])
                acked.set()
                continue
            acked.set()
            if method == "exit":
                return
            getattr(runner, method)(*args)
    finally:
        shm.close()
        runner.exit()
