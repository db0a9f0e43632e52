"""bench.py's workloads: the reference draws stay nano-vLLM's, every workload's totals stay its checksum,
and `--help` documents each one. CPU only, no model."""
import os
import random
import subprocess
import sys

import pytest

import bench


def reference_draws(num_seqs: int, max_input_len: int, max_output_len: int) -> tuple[int, int]:
    """nano-vLLM's bench.py, as written there: the global generator, all prompts first, then max_tokens."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))] for _ in range(num_seqs)]
    max_tokens = [random.randint(100, max_output_len) for _ in range(num_seqs)]
    return sum(map(len, prompts)), sum(max_tokens)


def test_reference_is_nano_vllms_workload():
    state = random.getstate()
    try:
        expected = reference_draws(256, 1024, 1024)
    finally:
        random.setstate(state)
    workload = bench.make_workload(bench.WORKLOADS["reference"])
    assert workload.totals == (*expected, 256) == (142_827, 133_966, 256)


@pytest.mark.parametrize("name", list(bench.WORKLOADS))
def test_workload_totals_match_checksum_and_recipe(name):
    spec = bench.WORKLOADS[name]
    workload = bench.make_workload(spec)
    assert workload.totals == bench.WORKLOAD_TOTALS[name]
    prefix = workload.prompt_token_ids[0][:spec.prefix_len]
    for prompt, max_tokens in zip(workload.prompt_token_ids, workload.max_tokens):
        assert prompt[:spec.prefix_len] == prefix
        assert spec.prompt_len[0] <= len(prompt) - spec.prefix_len <= spec.prompt_len[1]
        assert spec.output_len[0] <= max_tokens <= spec.output_len[1]
        assert len(prompt) + max_tokens <= 4096  # every workload fits the default max_model_len
    assert len({tuple(p) for p in workload.prompt_token_ids}) == len(workload.prompt_token_ids)
    params = bench.nanovllm_params(workload)   # the engine gets the workload's sampling settings
    assert {(p.temperature, p.top_p, p.top_k, p.n, p.ignore_eos) for p in params} == {
        (spec.temperature, spec.top_p, spec.top_k, spec.n, True)}
    assert [p.max_tokens for p in params] == workload.max_tokens


def test_caps_and_scale_shrink_every_workload():
    args = bench.parse_args(["--workload", "all", "--scale", "0.01", "--max-input-len", "40", "--max-output-len", "8"])
    for workload in bench.build_workloads(args).values():
        spec = workload.spec
        assert len(workload.max_tokens) == max(1, round(spec.num_requests * 0.01))
        assert max(map(len, workload.prompt_token_ids)) <= 40 and max(workload.max_tokens) <= 8
        shared = workload.prompt_token_ids[0][:spec.prefix_len and 20]
        assert all(p[:len(shared)] == shared for p in workload.prompt_token_ids)


def test_dry_run_prints_each_workloads_totals(capsys):
    names = ["reference", "long", "sampling-n"]  # the quick ones: the others' totals are checked above
    assert bench.main(["--dry-run", "--workload", ",".join(names)]) == 0
    out = capsys.readouterr().out
    for name in names:
        prompt, output, requests = bench.WORKLOAD_TOTALS[name]
        assert f"Workload {name}: {requests} requests, prompt tokens: {prompt}, output tokens: {output}" in out
    assert out.count("Checksum: matches") == len(names)


def test_help_documents_every_workload_without_importing_torch():
    code = "import sys, runpy; sys.argv = ['bench.py', '--help']\n" \
           "try: runpy.run_path('bench.py', run_name='__main__')\n" \
           "except SystemExit: pass\n" \
           "assert 'torch' not in sys.modules and 'nanovllm' not in sys.modules, 'help imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=bench.HERE, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.strip().startswith("| ")}
    for name, spec in bench.WORKLOADS.items():
        prompt, output, _ = bench.WORKLOAD_TOTALS[name]
        assert f"{spec.num_requests:,}" in rows[name] and f"{prompt:,} / {output:,}" in rows[name]
    assert "(default: reference)" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--workload", "nope"], "unknown ['nope']"),
    (["--workload", "long", "--max-model-len", "2048"], "too short for ['long']"),
    (["--scale", "0"], "--scale must be a finite number > 0"),
    (["--scale", "inf"], "--scale must be a finite number > 0"),
    (["--scale", "nan"], "--scale must be a finite number > 0"),
    (["--backend", "hf", "--workload", "sampling-n"], "nanovllm backend only"),
    (["--model", "x", "--model-config", "qwen3-30b-a3b"], "exclude each other"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_structured_constraints():
    workload = bench.make_workload(bench.WORKLOADS["reference"], num_requests=8)
    schema = bench.structured_outputs("json", workload, 7)["json"]
    assert schema["properties"]["text"]["minLength"] == max(workload.max_tokens) * 7
    assert bench.structured_outputs("regex", workload, 7) == {"regex": bench.STRUCTURED_REGEX}
    assert bench.structured_outputs("none", workload, 7) is None


def test_structured_constraints_hold_on_the_bench_tokenizer():
    """The benchmark checkpoints' tokenizer can spell the JSON document, and neither constraint lets a
    request finish (close the document, or allow only EOS) before max_tokens, even on the longest tokens."""
    xgr = pytest.importorskip("xgrammar")
    vocab_size, max_tokens = 512, 40
    tokenizer = bench.make_bench_tokenizer(vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    from nanovllm import SamplingParams
    from nanovllm.engine.structured_output import GrammarManager
    # NOTE: compiled as the engine compiles them (compact JSON), not with xgrammar's defaults
    manager = GrammarManager(tokenizer, vocab_size, frozenset({tokenizer.eos_token_id}))

    def compiled(constraint: dict):
        params = SamplingParams(max_tokens=max_tokens, structured_outputs=constraint)
        manager.check(0, params)
        return manager._compiled[params.structured_outputs]
    longest = max(tokenizer.get_vocab(), key=len)
    word = ids(max((t for t in tokenizer.get_vocab() if t.startswith("t")), key=len))  # the longest word
    workload = bench.Workload(bench.PROBE, [[1]], [max_tokens])
    schema = bench.structured_outputs("json", workload, len(longest))["json"]
    quote, eos = ids('"'), tokenizer.eos_token_id
    for grammar, opening in ((compiled({"json": schema}), list('{"text":"')),
                             (compiled({"regex": bench.STRUCTURED_REGEX}), [])):
        matcher, mask = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, vocab_size)
        assert all(matcher.accept_token(t) for t in ids(opening))
        for _ in range(max_tokens - len(opening)):
            matcher.fill_next_token_bitmask(mask)
            allowed = {t for t in (quote, eos, word) if mask[0, t // 32] >> (t % 32) & 1}
            assert word in allowed  # more than EOS: the request goes on
            if opening:             # and the JSON string cannot close yet
                assert quote not in allowed and eos not in allowed
            assert matcher.accept_token(word)
        assert not matcher.is_terminated()


def test_hf_baseline_runs_on_dummy_weights(tmp_path):
    """--backend hf --load-format dummy (the 30B MoE baseline, whose weight files bench.py never
    writes): the HF model is built from config.json alone, random, on the device."""
    import json
    from nanovllm.utils.random_checkpoint import QWEN3_0_6B_CONFIG
    config = dict(QWEN3_0_6B_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = bench.HFRunner(str(tmp_path), "cpu", batch_size=2, dummy=True)
    assert runner.model.config.hidden_size == 32 and not any(p.is_meta for p in runner.model.parameters())
    workload = bench.Workload(bench.PROBE, [[1, 2, 3], [4, 5]], [3, 2])
    assert runner.prepare(workload)() == 5


def test_a_changed_package_is_not_labelled_as_its_head(tmp_path):
    # a copy whose git metadata is stale (as on the device machines) must not pass for HEAD
    def git(*cmd):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *cmd],
                       check=True, capture_output=True)
    (tmp_path / "nanovllm").mkdir()
    (tmp_path / "nanovllm" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = bench.git_commit(str(tmp_path))
    assert head and "+" not in head
    (tmp_path / "nanovllm" / "a.py").write_text("x = 2\n")
    assert bench.git_commit(str(tmp_path)) == head + "+changes"


@pytest.mark.parametrize("name,vocab_size", [("shared-prefix", None), ("sampling-n", 500)])
def test_warmup_is_a_miniature_that_shares_no_prompt_block(name, vocab_size):
    # the untimed miniature compiles the workload's kernel variants; were any of its prompt
    # blocks equal to the workload's, the prefix cache would speed up the timed run
    workload = bench.fit_to_vocab(bench.make_workload(bench.WORKLOADS[name]), vocab_size)
    warm = bench.warmup_workload(workload)
    assert warm.spec == workload.spec
    assert len(warm.prompt_token_ids) == min(bench.WARMUP_REQUESTS, len(workload.prompt_token_ids))
    ids = {t for p in workload.prompt_token_ids for t in p}
    for real, mini, real_max, mini_max in zip(workload.prompt_token_ids, warm.prompt_token_ids,
                                              workload.max_tokens, warm.max_tokens):
        assert len(mini) == len(real) and mini_max == min(real_max, bench.WARMUP_TOKENS)
        assert all(a != b for a, b in zip(real, mini))
        assert max(mini) <= max(ids)  # within the (folded) vocabulary
    assert warm.prompt_token_ids[0][:warm.spec.prefix_len] == warm.prompt_token_ids[-1][:warm.spec.prefix_len]


def test_records_give_prompt_throughput_and_the_report_a_prefill_row(tmp_path, monkeypatch):
    """Every record carries prompt tokens/s; the suite report adds it as a row for the
    prompt-bound prefill workload (its output tok/s alone says little to a user)."""
    import json
    import time
    monkeypatch.syspath_prepend(os.path.join(bench.HERE, "benchmarks"))
    import suite_report

    class Runner:  # the workload's tokens after a pause: no model needed
        def __init__(self, pause: float):
            self.pause = pause

        def prepare(self, workload, structured=None):
            def run():
                time.sleep(self.pause)
                return workload.totals[1]
            return run

    args = bench.parse_args(["--workload", "prefill", "--scale", "0.01", "--device", "cpu"])
    workload = bench.build_workloads(args)["prefill"]
    records = {}
    for label, pause in (("base", 0.04), ("new", 0.02)):
        record = bench.run_workload(args, Runner(pause), workload)
        assert record["prompt_throughput_tok_s"] == pytest.approx(workload.totals[0] / record["time_s"])
        records[label] = record
        (tmp_path / f"prefill.{label}.json").write_text(json.dumps({"workloads": {"prefill": record}}))
    rows = suite_report.table(suite_report.load_runs(str(tmp_path)))
    base, new = (records[label]["prompt_throughput_tok_s"] for label in ("base", "new"))
    assert f"| prefill, prompt tokens/s | {base:,.0f} | {new:,.0f} | {new / base:.2f}x |" in rows
