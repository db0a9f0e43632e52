"""Mixed steps (decodes + prefill chunks in one step) run their decode rows through the
decode kernel and are replayed as piecewise CUDA graphs on the GPU. Neither may change
what a request produces: the oracle is the same engine without them (itself checked
against HF by tests/models), compared exactly on CPU, where the piecewise runner runs
its pieces eagerly with the same padding as the graphs."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import piecewise_graphs
from nanovllm.engine.piecewise_graphs import PiecewiseGraphs, token_buckets
from nanovllm.utils.context import AttentionMetadata
from tests.e2e.test_invariance import completions
from tests.e2e.test_overlap import workload

# small budget and cache: chunked prefill, preemption, prefix hits, and many mixed steps
STRESSED = dict(max_num_batched_tokens=96, num_kvcache_blocks=24, kvcache_block_size=16, max_model_len=256)


def run(llm: LLM) -> list:
    prompts, params = workload(seed=11, num=16)
    prompts += [prompts[0][:50] + [7] * 9, prompts[0][:50] + [8] * 3]  # prefix-cache hits
    params += [SamplingParams(temperature=0, max_tokens=12)] * 2
    return [completions(out) for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Outputs with every step unsplit and unpadded."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AttentionMetadata, "split", property(lambda self: None))
        llm = LLM(checkpoint(), device="cpu", **STRESSED)
        out = run(llm)
        llm.exit()
    return out


def test_split_attention_is_exact(checkpoint, reference, monkeypatch):
    splits = []
    original = AttentionMetadata.split.func
    monkeypatch.setattr(AttentionMetadata, "split",
                        property(lambda self: splits.append(self.num_decodes) or original(self)))
    llm = LLM(checkpoint(), device="cpu", **STRESSED)
    assert run(llm) == reference
    assert any(d > 0 for d in splits), "no mixed step was split"


def test_piecewise_pieces_are_exact(checkpoint, reference, monkeypatch):
    """The piecewise runner's pieces, padded to token buckets, equal the plain forward."""
    monkeypatch.setattr(piecewise_graphs, "token_buckets", lambda max_tokens: [8, 32, 64])
    llm = LLM(checkpoint(), device="cpu", **STRESSED)
    runner = llm.model_runner
    pieces = PiecewiseGraphs(runner.model, 64, runner.dtype, runner.device)
    runs = []
    original_run = pieces.run
    pieces.run = lambda inputs: runs.append(inputs.input_ids.shape[0]) or original_run(inputs)
    runner.piecewise_graphs = pieces  # no capture on CPU: the pieces run eagerly
    assert run(llm) == reference
    assert any(n not in (8, 32, 64) for n in runs), "no step was padded"


def test_token_buckets():
    sizes = token_buckets(4096)
    assert sizes[0] == 32 and sizes[-1] == 4096 and sizes == sorted(set(sizes))
    # padding to the next bucket wastes at most 1/8 of a step's rows past 256 tokens
    assert all((b - a) / a <= 0.125 for a, b in zip(sizes, sizes[1:]) if a >= 256)
    assert token_buckets(100)[-1] == 100
