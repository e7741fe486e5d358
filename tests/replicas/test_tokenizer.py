"""Tokenizer: encode/decode like transformers, incremental detokenization, stop-string search, chat template."""

from __future__ import annotations

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.replicas import Tokenizer
from lorafleet.replicas.tokenizer import find_stop

TEXTS = ["Hello, world!", "SELECT name FROM users WHERE age > 30;", "def f(x):\n    return x * 2\n",
         "héllo wörld — 日本語 🙂", "  leading spaces", ""]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_model_dir)


def test_matches_transformers(tokenizer, tiny_model_dir):
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf(text)["input_ids"]
        assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_ids == (1,) and tokenizer.bos_token_id == 0


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40), prompt=st.sampled_from(TEXTS[:4]))
def test_incremental_detokenization_equals_full_decode(tokenizer, text, prompt):
    prompt_ids, ids = tokenizer.encode(prompt), tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer(prompt_ids)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text == tokenizer.decode(ids)


def test_incremental_detokenization_waits_for_whole_characters(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = tokenizer.detokenizer([0])
    assert [detok.add(t) for t in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_find_stop_only_looks_at_new_text():
    assert find_stop("abc STOP def", ("STOP",), 12) == 4
    assert find_stop("abc STOP def", ("STOP",), 2) is None      # completed earlier, already handled
    assert find_stop("abc ST", ("STOP",), 2) is None
    assert find_stop("abc STOP", ("STOP",), 2) == 4              # completed by the last 2 characters
    assert find_stop("xx b a", ("a", "b"), 6) == 3               # the earliest of several


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_chat_template_from_chat_template_jinja_as_transformers_5_saves_it(tiny_model_dir, tmp_path):
    """transformers >= 5 writes the template to chat_template.jinja and not into tokenizer_config.json."""
    import json

    model = _copy_model(tiny_model_dir, tmp_path / "m")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = config.pop("chat_template")
    config_path.write_text(json.dumps(config))
    with pytest.raises(Exception, match="no chat template"):
        Tokenizer.from_model_dir(model).apply_chat_template([{"role": "user", "content": "hi"}])
    (model / "chat_template.jinja").write_text(template)
    rendered = Tokenizer.from_model_dir(model).apply_chat_template([{"role": "user", "content": "hi"}])
    hf = transformers.AutoTokenizer.from_pretrained(model)
    assert rendered == hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)


def test_generation_stops_on_the_end_of_turn_tokens_of_generation_config(tiny_model_dir, tmp_path, make_engine):
    """An instruct model ends a turn with its own token (<|im_end|> here), named in generation_config.json."""
    import json

    from lorafleet.replicas import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=False)
    free = make_engine(tiny_model_dir).generate("The quick brown fox", params)[0]
    assert free.finish_reason == "length" and len(set(free.token_ids)) > 1
    # Pretend a token that first appears at position i >= 2 ends a turn: generation must stop right there.
    i = next(i for i in range(2, len(free.token_ids)) if free.token_ids[i] not in free.token_ids[:i])
    end_of_turn = free.token_ids[i]
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, end_of_turn]}))
    stopped = make_engine(model).generate("The quick brown fox", params)[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:i + 1]
