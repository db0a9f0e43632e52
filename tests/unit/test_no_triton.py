"""The CPU path never needs triton or flash-attn (both are the `cuda` extra): in a fresh
interpreter where importing either fails, `import nanovllm` and a whole `LLM.generate`
on CPU work, and asking for CUDA says which extra to install instead of a bare
ModuleNotFoundError from deep inside the kernels."""
import subprocess
import sys

SCRIPT = """
import sys
sys.modules["triton"] = sys.modules["flash_attn"] = None   # `import triton` now raises ImportError
import torch
from nanovllm import LLM, SamplingParams
from nanovllm.layers.backends import resolve_backend

llm = LLM(sys.argv[1], device="cpu", num_kvcache_blocks=8, kvcache_block_size=16)
out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
assert len(out[0]["token_ids"]) == 4, out
llm.exit()
try:
    resolve_backend("auto", torch.device("cuda"), 256, torch.bfloat16)
except ImportError as e:
    assert '.[cuda]' in str(e), e
else:
    raise AssertionError("CUDA without triton was accepted")
assert sys.modules["triton"] is None and sys.modules["flash_attn"] is None
print("ok")
"""


def test_cpu_path_runs_without_triton(checkpoint):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, checkpoint()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
