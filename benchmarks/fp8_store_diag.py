"""Where does the Triton fp8 KV store differ from quantize_fp8 on the GPU? (diagnostic)"""
import torch
from nanovllm.kernels.fp8 import FP8_DTYPE, SCALE_DTYPE, quantize_fp8
from nanovllm.kernels.kv_store import store_kv

torch.manual_seed(0)
n, h, d, bs = 4096, 8, 128, 16
x = torch.randn(n, h, d, device="cuda") * torch.exp(torch.randn(n, h, 1, device="cuda") * 3.0)
x = x.to(torch.bfloat16)
slots = torch.arange(n, device="cuda")
shape = (n // bs, bs, h, d)
kc = torch.zeros(shape, dtype=torch.uint8, device="cuda").view(FP8_DTYPE)
vc = kc.clone()
ks = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device="cuda")
vs = ks.clone()
store_kv(x, x, kc, vc, slots, ks, vs)
q, s = quantize_fp8(x)
kq, kss = kc.view(n, h, d), ks.view(n, h)
print("scale mismatches", (kss != s).sum().item(), "of", s.numel())
bad = (kq.view(torch.uint8) != q.view(torch.uint8))
print("value mismatches", bad.sum().item(), "of", bad.numel())
idx = bad.nonzero()[:12]
for t, hh, dd in idx.tolist():
    xf = x[t, hh, dd].float().item()
    print(f"x={xf!r} scale_k={kss[t, hh].item()!r} scale_ref={s[t, hh].item()!r} x/scale={xf / s[t, hh].item()!r} "
          f"kernel={kq[t, hh, dd].float().item()!r} ref={q[t, hh, dd].float().item()!r}")
