"""Event readers: rumdect and CED Weibo, generic JSONL, Twitter, the tfds builder and the fixture.

Real-data tests read the shared samples at <repo>/../shared/data and skip when they are absent.
"""

import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mfjax import assets
from mfjax.data import jsonl, twitter, weibo
from mfjax.data.events import Agent, Event, EventDataError, select_agents

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RUMDECT_TEST = DATA / "weibo" / "test"
CED = DATA / "ced"
TWITTER = DATA / "twitter" / "events"
UTC = datetime.timezone.utc


def _need(path: Path):
    if not path.exists():
        pytest.skip(f"shared data sample {path} is not available")


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def _rumdect_record(i, t, text="评论", parent="1", **extra):
    record = {"id": str(i), "mid": str(i), "uid": 100 + i, "parent": parent, "t": t,
              "text": text, "original_text": text, "gender": "m", "friends_count": 5,
              "followers_count": 5, "reposts_count": 0, "comments_count": 0,
              "attitudes_count": 0, "verified": False, "verified_type": -1,
              "user_location": "北京", "user_description": "", "screen_name": "someone"}
    record.update(extra)
    return record


def _tiny_rumdect(directory: Path, event_id: str, n_agents: int, t0: int = 1000) -> Path:
    records = [_rumdect_record(0, t0, text="话题", parent=None)]
    records += [_rumdect_record(i, t0 + i, text=f"评论{i}") for i in range(1, n_agents + 1)]
    return _write_json(directory / f"{event_id}.json", records)


# ---------------------------------------------------------------- rumdect, real samples


def test_rumdect_real_directory():
    _need(RUMDECT_TEST)
    events = weibo.read_rumdect_dir(RUMDECT_TEST)
    files = sorted(p.name for p in RUMDECT_TEST.glob("*.json"))
    assert [e.event_id + ".json" for e in events] == files
    for event, name in zip(events, files):
        raw = json.loads((RUMDECT_TEST / name).read_text(encoding="utf-8"))
        source = [r for r in raw if r["parent"] is None]
        assert len(source) == 1
        assert event.topic == source[0]["text"]
        assert event.topic_time == source[0]["t"]
        assert event.num_agents == len(raw) - 1
        assert [a.time for a in event.agents] == sorted(r["t"] for r in raw[1:])
        assert event.language == "zh" and event.source_path.endswith(name)


def test_rumdect_real_record_fields_and_repost_rule():
    _need(RUMDECT_TEST)
    path = RUMDECT_TEST / "3476055656644087.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    event = weibo.read_rumdect_event(path)
    by_key = {(a.uid, a.time): a for a in event.agents}
    # Record 6 has an empty text: its action is "转发微博" + original_text (SPEC §2).
    assert raw[6]["text"] == ""
    agent = by_key[(str(raw[6]["uid"]), float(raw[6]["t"]))]
    assert agent.action == "转发微博//@笑天有点二:转发微博"
    # Record 2: every profile field copied, personal fields (screen name, avatar) left out.
    r = raw[2]
    agent = by_key[(str(r["uid"]), float(r["t"]))]
    assert agent.action == r["text"] == "太捧翔哥了吧。。。"
    assert agent.profile() == {k: r[k] for k in weibo.RUMDECT_PROFILE_KEYS}
    assert not any(f in {"screen_name", "username", "user_avatar"}
                   for f in dataclasses.asdict(agent))


# ---------------------------------------------------------------- rumdect, validation


def test_rumdect_malformed_json_names_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"t": 1, "text": "a"', encoding="utf-8")
    with pytest.raises(EventDataError, match="bad.json") as info:
        weibo.read_rumdect_event(path)
    assert "malformed JSON" in str(info.value)


def test_rumdect_not_a_list(tmp_path):
    path = _write_json(tmp_path / "obj.json", {"t": 1})
    with pytest.raises(EventDataError, match=r"obj\.json: expected a JSON array"):
        weibo.read_rumdect_event(path)


def test_rumdect_record_without_time(tmp_path):
    path = _tiny_rumdect(tmp_path, "e1", 3)
    records = json.loads(path.read_text(encoding="utf-8"))
    del records[2]["t"]
    _write_json(path, records)
    with pytest.raises(EventDataError, match=r"e1\.json, record 2: record has no time"):
        weibo.read_rumdect_event(path)


def test_rumdect_record_without_text(tmp_path):
    path = _tiny_rumdect(tmp_path, "e2", 3)
    records = json.loads(path.read_text(encoding="utf-8"))
    del records[1]["text"], records[1]["original_text"]
    _write_json(path, records)
    with pytest.raises(EventDataError, match=r"e2\.json, record 1: record has no text"):
        weibo.read_rumdect_event(path)


def test_rumdect_record_not_an_object_and_bad_field(tmp_path):
    path = _write_json(tmp_path / "e3.json", [_rumdect_record(0, 1, parent=None), "oops"])
    with pytest.raises(EventDataError, match=r"e3\.json, record 1: expected an object"):
        weibo.read_rumdect_event(path)
    path = _write_json(tmp_path / "e4.json", [_rumdect_record(0, 1, parent=None),
                                              _rumdect_record(1, 2, friends_count="many")])
    with pytest.raises(EventDataError, match=r"e4\.json, record 1: field 'friends_count'"):
        weibo.read_rumdect_event(path)


def test_rumdect_sorts_by_time_and_missing_source(tmp_path):
    records = [_rumdect_record(0, 10, parent=None), _rumdect_record(1, 30, text="late"),
               _rumdect_record(2, 20, text="early")]
    event = weibo.read_rumdect_event(_write_json(tmp_path / "e.json", records))
    assert [a.action for a in event.agents] == ["early", "late"]
    for r in records:
        r["parent"] = "x"
    with pytest.raises(EventDataError, match="no source post"):
        weibo.read_rumdect_event(_write_json(tmp_path / "nosrc.json", records))


def test_rumdect_dir_order_limit_and_labels(tmp_path):
    for eid in ("30", "10", "20"):
        _tiny_rumdect(tmp_path, eid, 2)
    (tmp_path / "notes.txt").write_text("not an event", encoding="utf-8")
    events = weibo.read_rumdect_dir(tmp_path, labels={"20": "rumor"}, limit=2)
    assert [e.event_id for e in events] == ["10", "20"]
    assert [e.label for e in events] == [None, "rumor"]


# ---------------------------------------------------------------- CED


def test_ced_real_event():
    _need(CED)
    name = "0_yBmepBtUB_2279086572"
    event = weibo.read_ced_event(CED, name)
    source = json.loads((CED / "original-microblog" / f"{name}.json").read_text("utf-8"))
    reactions = json.loads((CED / "rumor-repost" / f"{name}.json").read_text("utf-8"))
    assert event.label == "rumor" and event.language == "zh"
    assert event.topic == source["text"] and event.topic_time == 1347334462
    assert event.num_agents == len(reactions) == 205
    # "2012-09-11 11:35:48" Beijing time is 03:35:48 UTC.
    first = datetime.datetime(2012, 9, 11, 3, 35, 48, tzinfo=UTC).timestamp()
    assert event.agents[0].time == first
    assert all(a.time <= b.time for a, b in zip(event.agents, event.agents[1:]))
    assert all(not a.has_profile for a in event.agents)
    assert {a.action for a in event.agents} >= {r["text"] for r in reactions if r["text"]}


def test_ced_real_listing_is_deterministic():
    _need(CED)
    names = weibo.ced_event_names(CED)
    assert len(names) == 600 and names == sorted(names)
    assert {label for _, label in names} == {"rumor", "non-rumor"}
    events = weibo.read_ced_dir(CED, limit=3, label="non-rumor")
    assert [e.event_id for e in events] == [n for n, lab in names if lab == "non-rumor"][:3]
    assert all(e.label == "non-rumor" for e in events)


def test_parse_ced_date_is_beijing_time():
    expected = datetime.datetime(2012, 9, 16, 7, 5, 11, tzinfo=UTC).timestamp()
    assert weibo.parse_ced_date("2012-09-16 15:05:11") == expected


def _tiny_ced(root: Path, name: str, reactions, label_dir="rumor-repost", source=None):
    source = source or {"text": "源微博", "time": 1000, "user": "empty"}
    _write_json(root / "original-microblog" / f"{name}.json", source)
    _write_json(root / label_dir / f"{name}.json", reactions)


def _reaction(mid, parent, text, date="2013-01-01 08:00:00", uid="9"):
    return {"uid": uid, "mid": mid, "parent": parent, "text": text, "date": date, "kids": []}


def test_ced_empty_text_rule(tmp_path):
    reactions = [
        _reaction("a", "", "", "2013-01-01 08:00:01"),  # plain repost of the source
        _reaction("b", "", "好", "2013-01-01 08:00:02"),
        _reaction("c", "b", "", "2013-01-01 08:00:03"),  # plain repost of comment b
        _reaction("d", "c", "", "2013-01-01 08:00:04"),  # plain repost of c
        _reaction("e", "b", "同意", "2013-01-01 08:00:05"),
    ]
    _tiny_ced(tmp_path, "ev", reactions)
    actions = [a.action for a in weibo.read_ced_event(tmp_path, "ev").agents]
    assert actions == ["转发微博", "好", "转发微博//好", "转发微博////好", "同意"]
    actions = [a.action for a in weibo.read_ced_event(tmp_path, "ev", empty_text="source").agents]
    assert actions == ["转发微博源微博", "好", "转发微博源微博", "转发微博源微博", "同意"]
    with pytest.raises(ValueError, match="empty_text"):
        weibo.read_ced_event(tmp_path, "ev", empty_text="drop")


def test_ced_skips_are_counted(tmp_path, caplog):
    reactions = [_reaction("a", "", "一", "2013-01-01 08:00:02"),
                 _reaction("b", "", "二", "03月05日 05:11"),
                 _reaction("a", "", "一", "2013-01-01 08:00:02"),
                 _reaction("c", "", "三", "2013-01-01 08:00:01")]
    _tiny_ced(tmp_path, "ev", reactions, label_dir="non-rumor-repost",
              source={"text": "t", "time": "Sat Jun 29 12:40:09 +0800 2013", "user": "empty"})
    with caplog.at_level(logging.WARNING):
        event = weibo.read_ced_event(tmp_path, "ev.json")
    assert [a.action for a in event.agents] == ["三", "一"]
    assert event.label == "non-rumor"
    assert event.topic_time == datetime.datetime(2013, 6, 29, 4, 40, 9, tzinfo=UTC).timestamp()
    assert "skipped 1 reaction(s) whose date has no year" in caplog.text
    assert "skipped 1 duplicate reaction(s)" in caplog.text


@pytest.mark.parametrize("bad, index, message", [
    ({"mid": "x", "parent": "", "text": "a"}, 1, "record has no time 'date'"),
    ({"mid": "x", "parent": "", "date": "2013-01-01 08:00:00"}, 1, "record has no text"),
    ({"mid": "x", "parent": "", "text": "a", "date": "yesterday"}, 1, "unparseable date"),
])
def test_ced_validation_names_file_and_record(tmp_path, bad, index, message):
    _tiny_ced(tmp_path, "ev", [_reaction("a", "", "ok"), bad])
    with pytest.raises(EventDataError) as info:
        weibo.read_ced_event(tmp_path, "ev")
    text = str(info.value)
    assert f"rumor-repost{os.sep}ev.json, record {index}: {message}" in text


def test_ced_event_in_both_or_no_label_folder(tmp_path):
    _tiny_ced(tmp_path, "ev", [_reaction("a", "", "ok")])
    _write_json(tmp_path / "non-rumor-repost" / "ev.json", [])
    with pytest.raises(EventDataError, match="exactly one"):
        weibo.read_ced_event(tmp_path, "ev")
    with pytest.raises(EventDataError, match="exactly one"):
        weibo.read_ced_event(tmp_path, "missing")


# ---------------------------------------------------------------- schema helpers


def test_select_agents_strict_and_lenient(tmp_path, caplog):
    path = _tiny_rumdect(tmp_path, "few", 3)
    event = weibo.read_rumdect_event(path)
    assert len(select_agents(event, 2, strict=True)) == 2
    assert select_agents(event, None, strict=True) == event.agents
    with pytest.raises(EventDataError, match=r"few\.json: event few has 3 agents, fewer than"):
        select_agents(event, 5, strict=True)
    with caplog.at_level(logging.WARNING):
        assert select_agents(event, 5, strict=False) == event.agents
    assert "fewer than the 5 asked" in caplog.text and "few.json" in caplog.text


def test_schema_rejects_bad_values():
    with pytest.raises(TypeError, match="friends_count"):
        Agent(uid="1", time=1.0, action="a", friends_count=True)
    with pytest.raises(TypeError, match="time"):
        Agent(uid="1", time=float("nan"), action="a")
    agents = (Agent(uid="1", time=2.0, action="a"), Agent(uid="2", time=1.0, action="b"))
    with pytest.raises(ValueError, match="time order"):
        Event(event_id="e", topic="t", agents=agents)
    with pytest.raises(ValueError, match="language"):
        Event(event_id="e", topic="t", agents=(), language="fr")


# ---------------------------------------------------------------- JSONL


def test_jsonl_round_trip_real_events(tmp_path):
    _need(RUMDECT_TEST)
    events = weibo.read_rumdect_dir(RUMDECT_TEST, labels={"6143639461": "rumor"})
    path = tmp_path / "out" / "events.jsonl"
    assert jsonl.write_jsonl(events, path) == len(events)
    back = jsonl.read_jsonl(path)
    assert [dataclasses.replace(e, source_path=None) for e in back] == \
        [dataclasses.replace(e, source_path=None) for e in events]
    assert back[0].source_path == f"{path}:1"


@pytest.mark.parametrize("line2, message", [
    ('{"event_id": "b", "language": "zh", "topic": "t", "agents": [', "malformed JSON"),
    ('{"event_id": "b", "language": "zh", "topic": "t", "agents": [{"text": "x"}]}',
     "agent 0: no 'time'"),
    ('{"event_id": "b", "language": "zh", "topic": "t", "agents": [{"time": 1}]}',
     "agent 0: no 'text'"),
    ('{"event_id": "b", "language": "zh", "topic": "t", "agents": '
     '[{"time": 1, "text": "x", "profile": {"screen_name": "n"}}]}', "unknown profile keys"),
    ('{"event_id": "b", "language": "zh", "topic": "t", "agents": '
     '[{"time": 1, "text": "x", "profile": {"followers_count": "9"}}]}', "followers_count"),
    ('{"event_id": "b", "language": "de", "topic": "t", "agents": []}', "language"),
    ('[1, 2]', "expected a JSON object"),
])
def test_jsonl_validation_names_line(tmp_path, line2, message):
    good = '{"event_id": "a", "language": "zh", "topic": "t", "agents": []}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line2 + "\n", encoding="utf-8")
    with pytest.raises(EventDataError) as info:
        jsonl.read_jsonl(path)
    assert "bad.jsonl, line 3: " in str(info.value) and message in str(info.value)


def test_jsonl_sorts_agents_and_keeps_unknown_profile():
    event = jsonl.event_from_dict({
        "event_id": "e", "language": "en", "topic": "t", "label": "rumor", "agents": [
            {"time": 5, "text": "late", "profile": {"gender": "f"}},
            {"uid": "7", "time": 1, "text": "early"}]})
    assert [a.action for a in event.agents] == ["early", "late"]
    assert event.agents[0].uid == "7" and event.agents[1].uid == ""
    assert not event.agents[0].has_profile and event.agents[1].gender == "f"


# ---------------------------------------------------------------- Twitter


def test_twitter_real_event():
    _need(TWITTER)
    path = TWITTER / "E274.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    event, stats = twitter.read_twitter_event(path)
    deleted = sum(1 for v in raw.values() if v == [None, None])
    assert stats.deleted == deleted and stats.tweets == len(raw)
    ids = sorted((int(k) for k, v in raw.items() if v[1] is not None))
    assert event.topic == raw[str(ids[0])][1]
    assert event.num_agents == len(ids) - 1 and event.language == "en"
    # Its first tweet reads "4:30 AM - 21 Oct 2015" (Pacific daylight time = 11:30 UTC); the
    # snowflake id carries the same minute to the millisecond.
    minute = datetime.datetime(2015, 10, 21, 11, 30, tzinfo=UTC).timestamp()
    assert 0 <= event.topic_time - minute < 60


def test_tweet_time_pre_snowflake_is_pacific():
    # 6:17 PM Pacific standard time on 4 Mar 2008 is 02:17 UTC on 5 Mar.
    expected = datetime.datetime(2008, 3, 5, 2, 17, tzinfo=UTC).timestamp()
    assert twitter.tweet_time(766826971, "6:17 PM - 4 Mar 2008") == expected
    assert twitter.tweet_time(766826971, "6:17 PM - 4 Mar 2008\n\n   from Nowhere") == expected


def test_twitter_conversion_script(tmp_path):
    events_dir = tmp_path / "events"
    _write_json(events_dir / "E1.json", {
        "300": ["1:02 PM - 1 Jan 2009", "reply two"],
        "100": ["1:00 PM - 1 Jan 2009", "the topic"],
        "200": [None, None],
        "150": ["1:01 PM - 1 Jan 2009", "reply one"]})
    _write_json(events_dir / "E0.json", {"5": ["1:00 PM - 1 Jan 2009", "only topic"],
                                          "6": [None, None]})
    out = tmp_path / "tw.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "convert_twitter.py"),
         f"--twitter_dir={events_dir}", f"--out={out}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "events=2 agents=2 tweets=6 deleted=2" in result.stdout
    events = jsonl.read_jsonl(out)
    assert [e.event_id for e in events] == ["E0", "E1"]
    assert events[1].topic == "the topic"
    assert [a.action for a in events[1].agents] == ["reply one", "reply two"]


def test_twitter_validation(tmp_path):
    path = _write_json(tmp_path / "bad.json", {"5": ["1:00 PM - 1 Jan 2009", None]})
    with pytest.raises(EventDataError, match=r"bad\.json, tweet 5: tweet has no text"):
        twitter.read_twitter_event(path)
    path = _write_json(tmp_path / "gone.json", {"5": [None, None]})
    with pytest.raises(EventDataError, match="no tweet with text"):
        twitter.read_twitter_event(path)


# ---------------------------------------------------------------- shipped fixture


def test_fixture_files_are_small_and_clean():
    total = 0
    for name in assets.FIXTURE_FILES:
        path = Path(str(assets.events_path(name)))
        total += path.stat().st_size
        text = path.read_text(encoding="utf-8")
        assert "screen_name" not in text and "avatar" not in text
    assert total < 200_000


def test_fixture_events():
    ced = assets.read_fixture_events("ced_sample.jsonl")
    assert [e.label for e in ced] == ["rumor", "non-rumor"]
    assert all(e.num_agents == 64 for e in ced)
    rumdect, = assets.read_fixture_events("rumdect_sample.jsonl")
    assert rumdect.num_agents == 39 and all(a.has_profile for a in rumdect.agents)
    assert all(a.uid.startswith("u") for a in rumdect.agents)
    tweets = assets.read_fixture_events("twitter_sample.jsonl")
    assert [e.language for e in tweets] == ["en", "en"] and all(e.num_agents == 64 for e in tweets)
    with pytest.raises(ValueError, match="unknown fixture"):
        assets.events_path("nope.jsonl")


def test_fixture_matches_shared_source():
    _need(RUMDECT_TEST)
    rumdect, = assets.read_fixture_events("rumdect_sample.jsonl")
    real = weibo.read_rumdect_event(RUMDECT_TEST / f"{rumdect.event_id}.json")
    for fixed, orig in zip(rumdect.agents, real.agents):
        assert fixed.time == orig.time
        assert fixed.profile().keys() == orig.profile().keys()
        assert fixed.followers_count == orig.followers_count
    # Screen names in repost chains are masked.
    assert "转发微博//@用户:转发微博" in [a.action for a in rumdect.agents]


# ---------------------------------------------------------------- tfds builder


def test_default_imports_do_not_load_tfds():
    code = ("import sys, mfjax.data, mfjax.data.events, mfjax.data.weibo, mfjax.data.jsonl, "
            "mfjax.data.twitter, mfjax.sim.templates, mfjax.assets; "
            "assert 'tensorflow_datasets' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr


def test_tfds_builder_array_record_round_trip(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="tensorflow_datasets is not installed")
    pytest.importorskip("array_record", reason="array_record is not installed")
    from mfjax.data import tfds_weibo

    root = tmp_path / "rumdect"
    _tiny_rumdect(root / "train", "111", 3)
    _tiny_rumdect(root / "train", "112", 2, t0=5000)
    test_path = _write_json(root / "test" / "200.json", [
        _rumdect_record(0, 1344239713, text="话题", parent=None),
        _rumdect_record(1, 1344239799, text="", original_text="//@x:转发微博",
                        verified=True, verified_type=-1, user_description=None),
        _rumdect_record(2, 1344239886, text="第二条")])
    builder = tfds_weibo.make_builder(root, data_dir=tmp_path / "tfds")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source()
    assert set(source) == {"train", "test"}
    assert len(source["train"]) == 2 and len(source["test"]) == 1
    back = tfds_weibo.event_from_example(source["test"][0])
    expected = dataclasses.replace(weibo.read_rumdect_event(test_path), source_path=None)
    assert back == expected
    assert back.agents[0].user_description is None and back.agents[0].verified_type == -1
    train_ids = sorted(tfds_weibo.event_from_example(source["train"][i]).event_id
                       for i in range(2))
    assert train_ids == ["111", "112"]


# ---------------------------------------------------------------- single-event .json files


def test_single_event_json_files(tmp_path):
    from mfjax.data.sources import detect_format, iter_events

    rumdect = _tiny_rumdect(tmp_path / "r", "555", 3)
    generic = _write_json(tmp_path / "generic.json", jsonl.event_to_dict(assets.read_fixture_events("ced_sample.jsonl")[0]))
    tweets = _write_json(tmp_path / "tweets.json", {"100": ["11:18 AM - 20 Oct 2015", "A rumour"],
                                                    "101": ["11:20 AM - 20 Oct 2015", "Is it true?"]})
    assert detect_format(rumdect) == detect_format(generic) == "json"
    (event,) = iter_events(rumdect)
    assert event.event_id == "555" and event.num_agents == 3
    (event,) = iter_events(generic)
    assert event.num_agents == 64
    (event,) = iter_events(tweets)
    assert event.language == "en" and [a.action for a in event.agents] == ["Is it true?"]
    bad = _write_json(tmp_path / "bad.json", {"hello": 1})
    with pytest.raises(EventDataError, match="bad.json: not a single event"):
        list(iter_events(bad))
