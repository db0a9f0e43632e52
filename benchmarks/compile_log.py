"""Run a script (bench.py, by default) and log every Triton compile: when, which kernel, how
long, and during which `LLM.generate` call (0 = engine start, 1 = bench.py's warm-up, ...), so
one can see whether compiles fall inside a timed run. A cold cache shows every compile; set
TRITON_CACHE_DIR to a fresh folder per package to compare two versions fairly.

    python benchmarks/compile_log.py bench.py --workload reference
    PYTHONPATH=<other checkout> python benchmarks/compile_log.py bench.py   # an older version
"""
import runpy
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH, which picks the package

import triton.runtime.jit as jit  # noqa: E402

import nanovllm  # noqa: E402

START = time.perf_counter()
state = {"generate": 0, "seconds": {}}


def _logged_compile(compile_fn):
    def compile(self, *args, **kwargs):
        begin = time.perf_counter()
        kernel = compile_fn(self, *args, **kwargs)
        took = time.perf_counter() - begin
        call = state["generate"]
        state["seconds"][call] = state["seconds"].get(call, 0.0) + took
        print(f"[compile] generate #{call} at {begin - START:7.2f} s: {self.fn.__qualname__} {took:.3f} s",
              file=sys.stderr, flush=True)
        return kernel
    return compile


def _counted_generate(generate):
    def counted(self, *args, **kwargs):
        state["generate"] += 1
        begin = time.perf_counter()
        try:
            return generate(self, *args, **kwargs)
        finally:
            print(f"[generate] #{state['generate']} took {time.perf_counter() - begin:.3f} s; compile seconds by "
                  f"call so far: {state['seconds']}", file=sys.stderr, flush=True)
    return counted


def main() -> None:
    # NOTE: JITFunction._do_compile runs once per kernel variant a process has not built yet
    # (a hit in Triton's on-disk cache still passes through it, in milliseconds)
    jit.JITFunction._do_compile = _logged_compile(jit.JITFunction._do_compile)
    nanovllm.LLM.generate = _counted_generate(nanovllm.LLM.generate)
    script = sys.argv[1] if len(sys.argv) > 1 else "bench.py"
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
