"""The Tokenizer wrapper on a tiny offline sentencepiece tokenizer and on the real SmolLM2 one."""

import json
import os
import shutil

import pytest

from hf_fixtures import TRAINING_TEXT, make_tiny_tokenizer
from mfjax.io.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "chatml")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


def test_tiny_round_trips_mixed_text(tiny):
    assert tiny.vocab_size == 128
    for text in (TRAINING_TEXT[0], TRAINING_TEXT[2], TRAINING_TEXT[0] + " " + TRAINING_TEXT[3]):
        ids = tiny.encode(text)
        assert ids and all(0 <= i < tiny.vocab_size for i in ids)
        assert tiny.decode(ids) == text
    texts = TRAINING_TEXT[:4]
    batch = tiny.encode_batch(texts)
    assert batch == [tiny.encode(t) for t in texts]
    assert tiny.decode_batch(batch) == texts
    assert tiny.encode_batch([]) == []


def test_tiny_special_tokens(tiny, tiny_dir, tmp_path):
    assert tiny.eos_token_ids == (2,)
    assert tiny.pad_token_id == 2 and tiny.bos_token_id == 1
    ids = tiny.encode("<|im_start|>user")
    assert ids[0] == tiny.hf.convert_tokens_to_ids("<|im_start|>")
    assert tiny.decode(ids) == "user"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|im_start|>user"
    # generation_config.json eos ids join the tokenizer's.
    folder = shutil.copytree(tiny_dir, tmp_path / "with_gen")
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 127]}, f)
    assert Tokenizer.from_dir(folder).eos_token_ids == (2, 127)


def test_tiny_chat_template_parts(tiny):
    assert tiny.has_chat_template
    user = TRAINING_TEXT[1]
    prompt = tiny.apply_chat_template(user)
    assert prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    head, tail = tiny.chat_template_parts()
    assert head + user + tail == prompt
    head, tail = tiny.chat_template_parts(system="Be brief.")
    assert head == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert head + user + tail == tiny.apply_chat_template(user, system="Be brief.")


def test_without_chat_template(tmp_path):
    tok = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "plain", chat_template=None))
    assert not tok.has_chat_template
    assert tok.apply_chat_template("hello") == "hello"
    assert tok.chat_template_parts() == ("", "")


def test_sentencepiece_model_alone_loads(tiny, tiny_dir, tmp_path):
    # A folder with only the sentencepiece model (older checkpoints) is converted to a fast tokenizer.
    folder = tmp_path / "spm_only"
    folder.mkdir()
    shutil.copyfile(os.path.join(tiny_dir, "tokenizer.model"), folder / "tokenizer.model")
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False}, f)
    spm = Tokenizer.from_dir(folder)
    for text in TRAINING_TEXT:
        assert spm.encode(text) == tiny.encode(text)
    assert spm.pad_token_id == 2  # no pad token: falls back to eos


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir("/nonexistent/tokenizer")


def test_smollm2_tokenizer(smol):
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == (2,) and smol.pad_token_id == 2
    text = "谣言在微博上迅速传播. The rumour spread fast!"
    assert smol.decode(smol.encode(text)) == text
    head, tail = smol.chat_template_parts(system="You simulate a Weibo user.")
    assert head == "<|im_start|>system\nYou simulate a Weibo user.<|im_end|>\n<|im_start|>user\n"
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    assert smol.apply_chat_template("hi").startswith("<|im_start|>system\n")  # the template's default system
    # Token-space assembly (head + content + tail) gives the ids of the whole rendered prompt.
    for content in ("Topic: a rumour.\nState: curious.", "谣言。 Reply briefly."):
        assert smol.encode(head) + smol.encode(content) + smol.encode(tail) == smol.encode(head + content + tail)


def test_start_tokens_follow_the_tokenizer(tmp_path):
    """A tokenizer that puts BOS before every text (Llama-style) gets it at the start of every prompt
    assembled from segments; one that does not (SmolLM2's, Qwen2's), or a chat template that writes its
    own, gets nothing added."""
    from tokenizers.processors import TemplateProcessing

    from mfjax.assets import read_fixture_events
    from mfjax.sim import batch, templates
    from mfjax.sim.prompts import TokenTemplates

    plain = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "plain", chat_template=None))
    assert plain.start_tokens() == ()
    hf = plain.hf
    hf.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.save_pretrained(tmp_path / "bos")
    bos = Tokenizer.from_dir(tmp_path / "bos")
    assert bos.encode("话题", add_special_tokens=True)[0] == 1 and bos.start_tokens() == (1,)
    assert bos.start_tokens("<s>[INST] ") == ()  # a chat head that writes its own BOS
    tt = TokenTemplates.build(bos, "zh", chat=False, step_size=4)
    event = read_fixture_events("ced_sample.jsonl")[0]
    enc = batch.encode_event(event, bos, tt, num_agents=4, step_size=4, algorithm="mf", mf_with_states=False)
    assert enc.policy_head[0] == 1 and enc.mf_head[0] == 1
    assert enc.policy_head[1:] == bos.encode(templates.templates_for("zh").topic.format(topic=event.topic))
    plain = Tokenizer.from_dir(tmp_path / "plain")  # the object above was changed in place
    assert TokenTemplates.build(plain, "zh", chat=False, step_size=4).start == ()
