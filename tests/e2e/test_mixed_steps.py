"""Mixed steps (decodes + prefill chunks in one step) run their decode rows through the
decode kernel and are replayed as piecewise CUDA graphs on the GPU. Neither may change
what a request produces: the oracle is the same engine without them (itself checked
against HF by tests/models), compared exactly on CPU, where the piecewise runner runs
its pieces eagerly with the same padding as the graphs."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import piecewise_graphs
from nanovllm.engine.cuda_graph import DecodeRows
from nanovllm.engine.piecewise_graphs import PiecewiseGraphs, token_buckets
from nanovllm.layers.attention import Attention
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


@pytest.mark.parametrize("decode_rows", [512, 1])
def test_piecewise_pieces_are_exact(checkpoint, reference, monkeypatch, decode_rows):
    """The piecewise runner's pieces, padded to token buckets, equal the plain forward. The
    pieces attend for a mixed step's decode rows; with too few static rows for a step's
    decodes (1), that step attends for all its rows eagerly, as other steps do."""
    monkeypatch.setattr(piecewise_graphs, "token_buckets", lambda max_tokens: [8, 32, 64])
    llm = LLM(checkpoint(), device="cpu", **STRESSED)
    runner = llm.model_runner
    rows = DecodeRows(decode_rows, runner.max_model_len, runner.block_size, runner.decode_unit_size, runner.device)
    pieces = PiecewiseGraphs(runner.model, 64, runner.dtype, runner.device, rows)
    runs, in_piece, eager = [], [], []  # per piece: real decode rows attended; per eager call: num_decodes
    where = [None]  # None outside the piecewise runner, else "piece" or "eager"
    original_run, original_piece, original_attend = pieces.run, pieces._piece, Attention.attend

    def run_pieces(inputs):
        runs.append(inputs.input_ids.shape[0])
        where[0] = "eager"
        try:
            return original_run(inputs)
        finally:
            where[0] = None

    def piece(i, n):
        where[0], outer = "piece", where[0]
        in_piece.append(0)
        original_piece(i, n)
        where[0] = outer

    def attend(self, q, k, v, meta, out=None):
        if where[0] == "piece":
            in_piece[-1] += int(meta.context_lens.count_nonzero())
        elif where[0] == "eager":
            eager.append(meta.num_decodes)
        return original_attend(self, q, k, v, meta, out)
    pieces.run = run_pieces
    pieces._piece = piece
    monkeypatch.setattr(Attention, "attend", attend)
    runner.piecewise_graphs = pieces  # no capture on CPU: the pieces run eagerly
    assert run(llm) == reference
    assert any(n not in (8, 32, 64) for n in runs), "no step was padded"
    if decode_rows == 512:
        assert any(in_piece), "no decode row was attended inside a piece"
        assert not any(eager), "a mixed step's decode rows were attended eagerly"
    else:
        assert any(d > decode_rows for d in eager), f"no step had more decodes than the static rows {sorted(set(eager))}"


def test_token_buckets():
    sizes = token_buckets(4096)
    assert sizes[0] == 32 and sizes[-1] == 4096 and sizes == sorted(set(sizes))
    # padding to the next bucket wastes at most 1/8 of a step's rows past 256 tokens
    assert all((b - a) / a <= 0.125 for a, b in zip(sizes, sizes[1:]) if a >= 256)
    assert token_buckets(100)[-1] == 100
