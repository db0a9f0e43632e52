"""Tensor-parallel rank and collectives; at one rank every call is the identity.

The process group the model's collectives use is the calling engine's, set around its
work with `tp_group` (a context variable, so each thread sees its own): a one-rank
engine never touches a group that another engine in the process owns."""
import contextlib
import functools
from contextvars import ContextVar

import torch
import torch.distributed as dist

_group: ContextVar[dist.ProcessGroup | None] = ContextVar("nanovllm_tp_group", default=None)


@contextlib.contextmanager
def tp_group(group: dist.ProcessGroup | None):
    """Run the block's collectives on `group` (None: one rank, no collectives)."""
    token = _group.set(group)
    try:
        yield
    finally:
        _group.reset(token)


def in_tp_group(method):
    """Decorate a method of an object with a `tp_group` attribute to run inside that group."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with tp_group(self.tp_group):
            return method(self, *args, **kwargs)
    return wrapper


def tp_rank() -> int:
    group = _group.get()
    return dist.get_rank(group) if group is not None else 0


def tp_size() -> int:
    group = _group.get()
    return dist.get_world_size(group) if group is not None else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x, group=_group.get())
    return x


def gather_to_rank0(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each rank's shard along the last dim on rank 0 (None elsewhere)."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0, group=_group.get())
    return torch.cat(parts, dim=-1) if tp_rank() == 0 else None


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) must be divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator
