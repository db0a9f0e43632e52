"""The sampling kernels compile for an H100/H200 (sm_90) on this CPU machine, with Triton's own
ptxas, in every variant the sampler launches. The interpreter that runs the other kernel tests
here accepts code the compiler refuses (a name bound in both branches of an `if` with two
shapes, as the draw kernel's first form did), and CI has no GPU to find out."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")

SCRIPT = textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nanovllm.kernels import sampling as S, sampling_thresholds as T

    POINTERS = dict(temps_ptr="*fp32", keys_ptr="*i64", mask_ptr="*i32",
                    mask_rows_ptr="*i32", thresholds_ptr="*fp32", part_max_ptr="*fp32", part_mass_ptr="*fp32",
                    part_val_ptr="*fp32", part_idx_ptr="*i32", top_k_ptr="*i64", top_p_ptr="*fp32",
                    min_p_ptr="*fp32", partials_ptr="*fp32", state_ptr="*i64")

    def compile_sm90(kernel, num_warps, out="*i64", logits="*bf16", **constexprs):
        types = dict(POINTERS, out_ptr=out, logits_ptr=logits)
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps))

    for masked, threshold in itertools.product((False, True), repeat=2):
        flags = dict(CHUNK=S.CHUNK, BLOCK=S.BLOCK, MASKED=masked, THRESHOLD=threshold)
        compile_sm90(S._chunk_kernel, 4, **flags)
        compile_sm90(S._draw_kernel, 4, BLOCK_C=32, **flags)
    compile_sm90(T._chunk_max_kernel, 4, MASKED=True, CHUNK=T.CHUNK, BLOCK=T.BLOCK)
    for shift, logits in ((16, "*bf16"), (0, "*fp32")):   # float32: the penalties' copy
        search = dict(SHIFT=shift, BLOCK_C=32, CANDIDATES=T.CANDIDATES)
        for top_k, top_p in ((True, False), (False, True), (True, True)):
            for mass in sorted({top_p, not top_k}):
                compile_sm90(T._pass_kernel, 8, logits=logits, MASS=mass, TOP_K=top_k, TOP_P=top_p, MASKED=True,
                             CHUNK=T.CHUNK, BLOCK=T.BLOCK, **search)
            compile_sm90(T._threshold_kernel, 1, out="*fp32", TOP_K=top_k, TOP_P=top_p, MIN_P=True, **search)
    print("compiled")
''')


def test_sampling_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the real compiler
    env["TRITON_CACHE_DIR"] = str(tmp_path)   # a cached kernel would skip the compile
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
