"""The fused-MoE Triton kernels against the torch reference experts.

On CPU they run under Triton's interpreter (the root conftest sets TRITON_INTERPRET=1) at
small sizes; the `cuda` tests run them at Qwen3-30B-A3B's shapes, with the tile table's
tiles, across batch sizes 1..512 and expert loads from spread out to all-on-one-expert."""
import pytest
import torch

from nanovllm.kernels import fused_moe as moe_kernels
from nanovllm.kernels.fused_moe import MoeTiles, align_by_expert, fused_experts, sum_topk, topk_softmax
from nanovllm.layers.fused_moe import (FusedMoE, Routing, fused_experts_reference, select_experts,
                                       select_experts_reference)

LOADS = ["random", "all-on-one-expert", "few-experts-rest-empty"]


def make_routing(num_tokens: int, num_experts: int, top_k: int, load: str, device: str, seed: int = 0) -> Routing:
    """Top-k expert ids (distinct per token) and positive weights for a given expert load."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if load == "all-on-one-expert":  # every token's first choice is expert 3
        ids = torch.stack([torch.cat([torch.tensor([3]), row[row != 3][:top_k - 1]]) for row in ids])
    elif load == "few-experts-rest-empty":  # every token picks experts 0..top_k-1, the rest get none
        ids = torch.arange(top_k).expand(num_tokens, top_k)
    weights = torch.rand(num_tokens, ids.shape[1], generator=gen) + 0.1
    return Routing(weights.to(device), ids.to(torch.int32).to(device))


def make_weights(num_experts, hidden, inter, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5
    return gate_up.to(device, dtype), down.to(device, dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_matches_reference(device, renormalize):
    gen = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randn(20, 24, generator=gen),                        # distinct values
                        torch.randint(0, 3, (20, 24), generator=gen).float(),      # many ties
                        torch.zeros(1, 24)]).to(device)                            # all tied
    weights, ids = topk_softmax(logits, 5, renormalize)
    expected = select_experts_reference(logits, 5, renormalize)
    assert torch.equal(ids, expected.ids), "ties must go to the lowest expert id"
    torch.testing.assert_close(weights, expected.weights, atol=1e-6, rtol=1e-5)


def padding_slots(num_tokens: int, padded: list[int], device: str) -> torch.Tensor:
    """A slot mapping with slot -1 (a CUDA-graph padding row) at the rows `padded`."""
    slots = torch.arange(num_tokens, dtype=torch.int64)
    slots[padded] = -1
    return slots.to(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_topk_softmax_routes_padding_rows_to_no_expert(device):
    logits = torch.randn(12, 24, generator=torch.Generator().manual_seed(5)).to(device)
    padded = [0, 7, 11]
    slots = padding_slots(12, padded, device)
    weights, ids = topk_softmax(logits, 5, True, slots)
    plain_weights, plain_ids = topk_softmax(logits, 5, True)
    real = [t for t in range(12) if t not in padded]
    assert torch.equal(ids[real], plain_ids[real]) and torch.equal(weights[real], plain_weights[real])
    assert (ids[padded] == 24).all() and (weights[padded] == 0).all()
    expected = select_experts_reference(logits, 5, True, slots)
    assert torch.equal(ids, expected.ids)
    torch.testing.assert_close(weights, expected.weights, atol=1e-6, rtol=1e-5)


@pytest.fixture(params=["one-program", "count-scan-scatter"])
def align_path(request, monkeypatch):
    """Both alignment paths: the one-program kernel (decode sizes) and the general three kernels."""
    if request.param == "count-scan-scatter":
        monkeypatch.setattr(moe_kernels, "ONE_PROGRAM_PAIRS", 0)
    return request.param


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("num_tokens", [1, 17, 40])
def test_align_by_expert_covers_every_pair_once(num_tokens, load, align_path):
    routing = make_routing(num_tokens, 8, 2, load, "cpu")
    block_m = 16
    blocks = align_by_expert(routing.ids, 8, block_m)
    num_pairs = routing.ids.numel()
    assert len(blocks.pair_ids) <= num_pairs + min(8, num_pairs) * (block_m - 1) + block_m - 1
    flat = routing.ids.flatten()
    rows = blocks.pair_ids.view(-1, block_m)
    for expert, block in zip(blocks.block_experts.tolist(), rows):
        real = block[block < num_pairs]
        if expert < 0:
            assert len(real) == 0, "an unused block holds pairs"
            continue
        assert len(real) > 0, "a used block is all padding"
        assert (flat[real.long()] == expert).all(), "a block mixes experts"
    placed = blocks.pair_ids[blocks.pair_ids < num_pairs]
    assert sorted(placed.tolist()) == list(range(num_pairs))


@pytest.mark.parametrize("num_tokens", [3, 40])
def test_align_by_expert_places_no_pair_routed_to_no_expert(num_tokens, align_path):
    """Padding rows' pairs (id num_experts) get no row, so no block reads an expert for them:
    the blocks' experts are exactly the real tokens' experts."""
    routing = make_routing(num_tokens, 8, 2, "random", "cpu", seed=6)
    ids = routing.ids.clone()
    ids[1::2] = 8  # every other token is padding
    blocks = align_by_expert(ids, 8, 16)
    num_pairs = ids.numel()
    placed = blocks.pair_ids[blocks.pair_ids < num_pairs]
    real_pairs = (ids.flatten() < 8).nonzero().flatten()
    assert sorted(placed.tolist()) == real_pairs.tolist()
    used = set(blocks.block_experts[blocks.block_experts >= 0].tolist())
    assert used == set(ids[0::2].flatten().tolist())


@pytest.mark.parametrize("num_tokens,padded", [(6, [1, 4, 5]), (40, list(range(17, 40))), (2, [0, 1])])
def test_fused_experts_leave_padding_rows_zero_interpreted(num_tokens, padded, align_path):
    """Rows routed to no expert come out zero; the other rows are what they are alone."""
    gate_up, down = make_weights(8, 64, 32, torch.float32, "cpu")
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(7))
    logits = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(8))
    routing = select_experts_reference(logits, 2, True, padding_slots(num_tokens, padded, "cpu"))
    got = fused_experts(x, gate_up, down, routing.weights, routing.ids, MoeTiles(16, 32, 32, 4, 1))
    expected = fused_experts_reference(x, gate_up, down, routing)
    real = [t for t in range(num_tokens) if t not in padded]
    alone = fused_experts_reference(x[real], gate_up, down, select_experts_reference(logits[real], 2, True))
    assert (expected[padded] == 0).all() and (got[padded] == 0).all()
    torch.testing.assert_close(expected[real], alone, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens,load", [(1, "random"), (40, "random"), (17, "all-on-one-expert"),
                                             (40, "few-experts-rest-empty")])
def test_fused_experts_match_reference_interpreted(num_tokens, load, align_path):
    # small tiles keep the interpreter quick; 17 and 40 tokens on one expert span several blocks
    gate_up, down = make_weights(8, 64, 32, torch.float32, "cpu")
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(2))
    routing = make_routing(num_tokens, 8, 2, load, "cpu")
    got = fused_experts(x, gate_up, down, routing.weights, routing.ids, MoeTiles(16, 32, 32, 4, 1))
    torch.testing.assert_close(got, fused_experts_reference(x, gate_up, down, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape", [(1, 8, 64), (5, 3, 1500)])  # 1,500: a hidden size over one program's 1,024
def test_sum_topk_adds_the_slots_in_order(device, shape):
    pair_out = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(device)
    expected = pair_out[:, 0].clone()
    for k in range(1, shape[1]):
        expected += pair_out[:, k]
    ids = torch.zeros(shape[:2], dtype=torch.int32, device=device)  # every slot routed (to expert 0)
    assert torch.equal(sum_topk(pair_out, ids, 1), expected)


# ---- CUDA, at Qwen3-30B-A3B's shapes (hidden 2048, 128 experts, top-8, moe_intermediate 768)
E, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768


@pytest.fixture(scope="module")
def weights_bf16():
    return make_weights(E, HIDDEN, INTER, torch.bfloat16, "cuda")


def max_error_vs_fp32(out, x, gate_up, down, routing):
    exact = fused_experts_reference(x.float(), gate_up.float(), down.float(), routing)
    return (out.float() - exact).abs().max().item(), exact.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("num_tokens", [1, 7, 16, 64, 100, 256, 512, 2000, 3000])
def test_fused_experts_match_reference_cuda_bf16(weights_bf16, num_tokens, load):
    """No further from the float32 truth than the bf16 torch reference (+ 0.5% of the scale):
    the kernel rounds once where the reference rounds after every op."""
    gate_up, down = weights_bf16
    x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    routing = make_routing(num_tokens, E, TOP_K, load, "cuda")
    got = fused_experts(x, gate_up, down, routing.weights, routing.ids)
    reference = fused_experts_reference(x, gate_up, down, routing)
    err, scale = max_error_vs_fp32(got, x, gate_up, down, routing)
    ref_err, _ = max_error_vs_fp32(reference, x, gate_up, down, routing)
    assert err <= ref_err + 5e-3 * scale, f"kernel error {err:.3g} vs bf16 reference {ref_err:.3g} (scale {scale:.3g})"


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 512, 3000])  # 3000: the 128 x 256 down tile, 192 KiB in float32
def test_fused_experts_match_reference_cuda_fp32(num_tokens):
    gate_up, down = make_weights(16, 256, 128, torch.float32, "cuda")
    x = torch.randn(num_tokens, 256, device="cuda")
    routing = make_routing(num_tokens, 16, 4, "random", "cuda")
    got = fused_experts(x, gate_up, down, routing.weights, routing.ids)
    torch.testing.assert_close(got, fused_experts_reference(x, gate_up, down, routing), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 256])
def test_moe_layer_replays_in_a_cuda_graph(weights_bf16, num_tokens):
    """Router top-k + experts captured with one routing, replayed with others (spread out,
    all on expert 3, experts 0..7 only): no host sync, no data-dependent size."""
    with torch.device("cuda"):
        moe = FusedMoE(E, TOP_K, HIDDEN, INTER, renormalize=True).to(torch.bfloat16)
    moe.gate_up_proj.copy_(weights_bf16[0])
    moe.down_proj.copy_(weights_bf16[1])
    x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(num_tokens, E, device="cuda", dtype=torch.bfloat16)
    moe(x, logits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x, logits)
    for boost in (None, [3], list(range(TOP_K))):
        new = torch.randn(num_tokens, E, device="cuda", dtype=torch.bfloat16)
        if boost is not None:
            new[:, boost] += 20.0
        logits.copy_(new)
        graph.replay()
        torch.testing.assert_close(out, moe(x, logits), atol=0, rtol=0)
        routing = select_experts(logits, TOP_K, True)
        torch.testing.assert_close(out, fused_experts_reference(x, *weights_bf16, routing), atol=2e-2, rtol=2e-2)
