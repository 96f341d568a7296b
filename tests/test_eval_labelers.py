"""Rule labelers on hand-written examples (none from the validation sample), the text rules, the label
cache, and the validation command on a synthetic sample."""

import json

import pytest

from mfjax.eval import agreement, lexicons, schema, text, validation
from mfjax.eval.labelers import rules_for
from mfjax.eval.labelers.base import Comment, LabelCache, LabelJoinError, Population, label_populations

pytest.importorskip("jieba")
pytest.importorskip("pysenti")
pytest.importorskip("vaderSentiment")

PLAIN = dict(schema.PLAIN_REPOST_LABELS, keywords=[])


@pytest.fixture(scope="module")
def zh():
    return rules_for("zh")


@pytest.fixture(scope="module")
def en():
    return rules_for("en")


# --- text rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("t,lang,plain", [
    ("转发微博", "zh", True),
    ("转发微博//@用户:太可怕了[怒]", "zh", True),  # the chain is someone else's text
    ("@用户 @用户", "zh", True),
    ("扩散！", "zh", True),
    ("转发 //@用户: 真的吗", "zh", True),
    ("支持！//@用户:转发微博", "zh", False),
    ("[泪]", "zh", False),  # an emoticon is the author's own reaction
    ("看 http://t.cn/abc", "zh", False),
    ("RT @user: something happened http://t.co/x", "en", True),
    ("http://t.co/abc", "en", True),
    ("Wow. RT @user: something happened", "en", False),
    ("Topic Headline Here! http://other.link/1", "en", True),  # a copy of the topic
    ("Topic headline here, so sad", "en", False),
])
def test_plain_repost_rule(t, lang, plain):
    assert text.is_plain_repost(t, lang, topic="Topic headline here http://t.co/src") is plain


def test_own_text_and_hash():
    assert text.own_text("好的//@用户:转发 http://t.cn/x", "zh") == "好的"
    assert text.own_text("see http://t.cn/x//y", "zh") == "see http://t.cn/x"  # a URL's // is not a chain
    assert text.own_text("Sad. RT @a: news", "en") == "Sad."
    # NFC: a precomposed and a decomposed "é" hash alike.
    assert text.text_hash("caf\u00e9") == text.text_hash("cafe\u0301")


# --- Chinese rules --------------------------------------------------------------------------

def test_zh_plain_reposts_get_the_fixed_labels(zh):
    for t in ("转发微博", "转发微博//@用户:天哪", "@用户", "转"):
        assert zh.label_text(t) == PLAIN


@pytest.mark.parametrize("t,expected", [
    ("太恶心了，这种人就该严惩！[怒]", {"sentiment_state": "angry", "sentiment_tendency": "negative",
                                   "subjectivity": "subjective", "intent": "opinion"}),
    ("[哈哈][哈哈]笑死我了", {"sentiment_state": "happy", "sentiment_tendency": "positive"}),
    ("一路走好[蜡烛][蜡烛]", {"sentiment_state": "sad", "sentiment_tendency": "negative"}),
    ("好可怕，晚上不敢出门了", {"sentiment_state": "fear", "sentiment_tendency": "negative"}),
    ("天哪！居然是这样[吃惊]", {"sentiment_state": "surprise"}),
    ("这是谣言，大家别信！", {"rumor": "counter", "belief_degree": "doubt", "stance": "oppose"}),
    ("真的假的？", {"rumor": "spread", "belief_degree": "doubt", "intent": "question"}),
    ("求辟谣", {"rumor": "spread", "belief_degree": "doubt", "sentiment_state": "calm"}),
    ("不是谣言，已经证实了", {"rumor": "spread", "belief_degree": "believe", "sentiment_state": "calm"}),
    ("这个地方在哪里？", {"intent": "question", "sentiment_state": "calm", "subjectivity": "objective"}),
    ("关注我，转发抽奖送手机 http://t.cn/abc", {"intent": "promotion"}),
    ("北京地铁今天发生故障", {"sentiment_tendency": "neutral", "subjectivity": "objective",
                            "behavior_type": "comment"}),
])
def test_zh_rules_on_hand_examples(zh, t, expected):
    got = zh.label_text(t)
    assert {k: got[k] for k in expected} == expected
    assert set(got) == set(schema.DIMENSIONS)


def test_zh_keywords_drop_emoticons_mentions_and_chain(zh):
    kws = zh.label_text("北京地铁今天发生故障[泪]@用户//@用户:上海也是")["keywords"]
    assert "北京地铁" in kws and "故障" in kws
    assert not any("泪" in k or "用户" in k or "上海" in k for k in kws)
    assert len(kws) <= schema.MAX_KEYWORDS


def test_zh_version_names_packages_and_lexicons(zh, monkeypatch):
    assert zh.version.startswith("rules-zh/") and "pysenti=" in zh.version and "jieba=" in zh.version
    assert f"lex={lexicons.files_hash('emoticons_zh.json', 'cues_zh.json')}" in zh.version
    # Without cntext the labeler still works and says so in its version.
    monkeypatch.setattr(lexicons, "cntext_dictionary", lambda name: None)
    bare = rules_for("zh")
    assert "dutir=absent" in bare.version
    assert bare.label_text("[怒]气死我了")["sentiment_state"] == "angry"


# --- English rules --------------------------------------------------------------------------

def _en_population(texts, topic="Man bites dog in city park http://a.co/1"):
    return Population("t/e", topic, "en", [Comment(f"c{i}", t, "en") for i, t in enumerate(texts)])


def test_en_share_detection_within_the_population(en):
    texts = ["Local paper: Mayor opens new bridge downtown today http://b.co/1",
             "Local paper: Mayor opens new bridge downtown today http://b.co/2",
             "Mayor opens new bridge downtown today - Daily http://b.co/3",
             "So sad: Mayor opens new bridge downtown today http://b.co/4",
             "Mayor opens new bridge downtown today",  # no link: not a headline share
             "RT @user: Man bites dog in city park",
             "Man bites dog in city park http://x.co/9"]
    labels = en.label(_en_population(texts))
    for i in (0, 1, 2):
        assert labels[f"c{i}"]["behavior_type"] == "share"
        assert labels[f"c{i}"]["subjectivity"] == "objective" and labels[f"c{i}"]["intent"] == "promotion"
    assert labels["c3"]["behavior_type"] == "comment"  # a word of feeling makes it a comment
    assert labels["c4"]["behavior_type"] == "comment"
    assert labels["c5"] == PLAIN and labels["c6"] == PLAIN


@pytest.mark.parametrize("t,expected", [
    ("This is a hoax, don't believe it", {"rumor": "counter", "belief_degree": "doubt", "stance": "oppose"}),
    ("Is this true??", {"belief_degree": "doubt", "rumor": "spread", "intent": "question"}),
    ("Is it a hoax?", {"belief_degree": "doubt", "rumor": "spread"}),
    ("So sad, RIP 😢", {"sentiment_state": "sad", "sentiment_tendency": "negative", "subjectivity": "subjective"}),
    ("LOL this is hilarious 😂", {"sentiment_state": "happy", "sentiment_tendency": "positive"}),
    ("I hate these idiots, disgusting", {"sentiment_state": "angry", "sentiment_tendency": "negative"}),
    ("OMG wow", {"sentiment_state": "surprise"}),
    ("Not a hoax, it's confirmed", {"rumor": "spread", "belief_degree": "believe"}),
    ("Rumors that the show will return", {"rumor": "spread"}),  # reporting a rumour is not countering it
    ("He never said that http://www.snopes.com/quote", {"rumor": "counter"}),
])
def test_en_rules_on_hand_examples(en, t, expected):
    got = en.label(_en_population([t]))["c0"]
    assert {k: got[k] for k in expected} == expected


def test_en_version(en):
    assert en.version.startswith("rules-en/") and "vader=" in en.version and "textblob=" in en.version


# --- label cache -----------------------------------------------------------------------------

class CountingLabeler:
    name, language = "counting", "zh"

    def __init__(self):
        self.calls = 0

    @property
    def version(self):
        return "counting/1"

    def label(self, population):
        self.calls += 1
        return {c.id: dict(PLAIN, keywords=[c.text]) for c in population.comments}


def test_cache_roundtrip_and_text_hash_check(tmp_path):
    cache = LabelCache(tmp_path / "labels")
    lab = CountingLabeler()
    pop = Population("real/e1", "topic", "zh", [Comment("e1#r0", "甲", "zh"), Comment("e1#r1", "乙", "zh")])
    labels, versions = label_populations(lambda lang: lab, [pop], cache)
    assert labels["e1#r1"]["keywords"] == ["乙"] and versions == {"zh": "counting/1"}
    again, _ = label_populations(lambda lang: lab, [pop], cache)
    assert again == labels and lab.calls == 1
    rows = [json.loads(x) for x in cache.path(lab, pop).read_text(encoding="utf-8").splitlines()]
    assert rows[0]["labeler_version"] == "counting/1" and rows[0]["text_sha256"] == text.text_hash("甲")
    changed = Population("real/e1", "topic", "zh", [Comment("e1#r0", "丙", "zh"), Comment("e1#r1", "乙", "zh")])
    with pytest.raises(LabelJoinError, match="e1#r0"):
        label_populations(lambda lang: lab, [changed], cache)


def test_unknown_ids_from_a_labeler_are_refused(tmp_path):
    class Bad(CountingLabeler):
        def label(self, population):
            return {"someone-else": PLAIN}

    pop = Population("real/e1", "t", "zh", [Comment("e1#r0", "甲", "zh")])
    with pytest.raises(LabelJoinError, match="unknown ids"):
        label_populations(lambda lang: Bad(), [pop], LabelCache(tmp_path))


# --- validation command on a synthetic sample ------------------------------------------------

def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_validation_reports_agreement_and_verdicts(tmp_path, monkeypatch):
    texts = ["[怒]气死了", "[哈哈]太好笑了", "真的假的？", "转发微博", "这是谣言！", "[泪]可怜", "北京下雨了", "支持！"]
    items = [{"id": f"e{i % 3}#r{i}", "event_id": f"e{i % 3}", "topic": "某地发生一件事", "text": t,
              "is_repost": t == "转发微博", "split": "test", "stratum": "other"} for i, t in enumerate(texts)]
    _write(tmp_path / "zh" / "sample.jsonl", items)
    zh = rules_for("zh")
    rules = {it["id"]: zh.label_text(it["text"]) for it in items}
    # Annotator A agrees with the rules except on one state; B flips one more.
    a = {k: dict(v) for k, v in rules.items()}
    a["e0#r0"]["sentiment_state"] = "sad"
    b = {k: dict(v) for k, v in a.items()}
    b["e1#r1"]["sentiment_state"] = "calm"
    _write(tmp_path / "zh" / "labels_a.jsonl", [dict(v, id=k) for k, v in a.items()])
    _write(tmp_path / "zh" / "labels_b.jsonl", [dict(v, id=k) for k, v in b.items()])
    status_copy = tmp_path / "status.json"
    status_copy.write_text((validation.status_mod.STATUS_PATH).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(validation.status_mod, "STATUS_PATH", status_copy)
    assert validation.main(tmp_path, None, write_status=True, n_resamples=50) == 0
    report = json.loads((tmp_path / "zh" / "validation_report.json").read_text(encoding="utf-8"))
    ids = [it["id"] for it in items]
    for name, ref in (("a", a), ("b", b)):
        m = agreement.confusion([ref[i]["sentiment_state"] for i in ids], [rules[i]["sentiment_state"] for i in ids],
                                "sentiment_state")
        assert report[f"rules_vs_{name}_test"]["sentiment_state"]["kappa"] == pytest.approx(agreement.cohen_kappa(m))
    assert report["inter_annotator_test"]["intent"]["kappa"] == pytest.approx(1.0)
    status = json.loads(status_copy.read_text(encoding="utf-8"))
    verdict = status["verdicts"][zh.version]["dimensions"]
    assert verdict["intent"]["verdict"] == "pass"
    kappa_state = verdict["sentiment_state"]["kappa"]
    assert verdict["sentiment_state"]["verdict"] == ("pass" if kappa_state >= 0.6 else "judge_only")
    # The verdicts now decide what metrics may report for this exact version.
    from mfjax.eval import status as status_mod

    rep = status_mod.reportable(zh.version, status)
    assert "intent" in rep["reportable"]


def test_validation_without_labels_says_so(tmp_path, capsys):
    _write(tmp_path / "zh" / "sample.jsonl", [{"id": "e#r0", "event_id": "e", "topic": "t", "text": "好",
                                               "is_repost": False, "split": "test", "stratum": "other"}])
    _write(tmp_path / "en" / "sample.jsonl", [{"id": "e#r0", "event_id": "e", "topic": "t", "text": "ok",
                                               "is_repost": False, "split": "test", "stratum": "other"}])
    assert validation.main(tmp_path, None, write_status=False) == 0
    out = capsys.readouterr().out
    assert "no reference labels yet" in out and "nothing validated" in out


def test_validation_rejects_out_of_enum_labels(tmp_path, capsys):
    _write(tmp_path / "zh" / "sample.jsonl", [{"id": "e#r0", "event_id": "e", "topic": "t", "text": "好",
                                               "is_repost": False, "split": "test", "stratum": "other"}])
    _write(tmp_path / "zh" / "labels_a.jsonl", [dict(PLAIN, id="e#r0", stance="maybe")])
    assert validation.main(tmp_path, None, write_status=False) == 2
    assert "labels_a.jsonl: line 1: stance='maybe'" in capsys.readouterr().out
