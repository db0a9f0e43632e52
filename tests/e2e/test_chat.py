"""`LLM.chat` / `LLM.chat_stream`: conversations through a chat template, then exactly
`generate` / `stream`. The tiny checkpoint's tokenizer maps word `t{i}` to token i, so a
template that writes words gives prompt ids we can write down by hand (the oracle)."""
import pytest

from nanovllm import LLM, SamplingParams

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# t3 <content> t4 per message, t5 as the generation prompt, t6 when the template's `greet` is set
TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "t3 {{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t5{% endif %}{% if greet %} t6{% endif %}")
CONVERSATIONS = [[{"role": "user", "content": "t10 t11"}],
                 [{"role": "system", "content": "t20"}, {"role": "user", "content": "t21 t22 t23"}]]
PROMPT_IDS = [[3, 10, 11, 4, 5], [3, 20, 4, 3, 21, 22, 23, 4, 5]]


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint("qwen3"), **ENGINE)
    engine.tokenizer.chat_template = TEMPLATE
    yield engine
    engine.exit()


def test_chat_equals_generate_on_the_template_applied_prompt(llm):
    outs = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    expected = llm.generate(PROMPT_IDS, GREEDY, use_tqdm=False)
    assert [o["prompt_token_ids"] for o in outs] == PROMPT_IDS
    assert [o["token_ids"] for o in outs] == [e["token_ids"] for e in expected]
    assert [o["text"] for o in outs] == [e["text"] for e in expected]
    # one conversation alone is a conversation, not a list of them
    (single,) = llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False)
    assert single["token_ids"] == expected[0]["token_ids"]


def test_template_options_reach_the_template(llm):
    (out,) = llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False, chat_template_kwargs={"greet": True})
    assert out["prompt_token_ids"] == PROMPT_IDS[0] + [6]
    (out,) = llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert out["prompt_token_ids"] == PROMPT_IDS[0][:-1]
    (out,) = llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False, chat_template="t7 {{ messages[0]['content'] }}")
    assert out["prompt_token_ids"] == [7, 10, 11]


def test_chat_stream_deltas_add_up_to_chat(llm):
    expected = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    got = {0: [], 1: []}
    for delta in llm.chat_stream(CONVERSATIONS, GREEDY):
        got[delta["index"]] += delta["token_ids"]
    assert [got[0], got[1]] == [e["token_ids"] for e in expected]


@pytest.mark.parametrize("messages, match", [
    ("hi", r"messages must be a conversation"),
    ([], r"messages must be a conversation"),
    ([CONVERSATIONS[0], "t5"], r"conversations\[1\] must be a non-empty list"),
    ([[{"role": "user"}]], r"conversations\[0\]\[0\] has no 'content' key"),
    ([[{"role": 1, "content": "t5"}]], r"conversations\[0\]\[0\]: role must be a string"),
    ([CONVERSATIONS[0], [{"role": "robot", "content": "t5"}]],
     r"conversations\[1\]: the chat template rejected it: unknown role robot"),
])
def test_bad_conversations_fail_before_any_request_runs(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert not llm.has_unfinished_work()


@pytest.mark.parametrize("template, match", [
    ("{{ 1 / 0 }}", "division by zero"),
    ("{{ messages[5]['content'] }}", "no element 5"),
])
def test_any_error_of_a_template_names_the_conversation(llm, template, match):
    """A template is code: whatever its expressions raise becomes the conversation's ValueError."""
    with pytest.raises(ValueError, match=rf"conversations\[0\]: the chat template rejected it: .*{match}"):
        llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False, chat_template=template)
    assert not llm.has_unfinished_work()


def test_no_chat_template_is_a_clear_error(llm, monkeypatch):
    monkeypatch.setattr(llm.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match=r"conversations\[0\]: the tokenizer has no chat template; pass chat_template"):
        llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat_stream(CONVERSATIONS, GREEDY)


def test_a_conversation_too_long_is_named_as_a_conversation(llm):
    """The length checks run on the template's token ids; the error names the conversation."""
    long_turn = [{"role": "user", "content": " ".join(["t10"] * 300)}]  # t3, 300 x t10, t4, t5: 303 ids
    for run in (lambda: llm.chat([CONVERSATIONS[0], long_turn], GREEDY, use_tqdm=False),
                lambda: llm.chat_stream([CONVERSATIONS[0], long_turn], GREEDY)):
        with pytest.raises(ValueError, match=rf"^conversations\[1\]: prompt length {300 + 3} \+ max_tokens 6"):
            run()
        assert not llm.has_unfinished_work()
