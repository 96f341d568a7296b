"""Prompt text templates: byte-for-byte SPEC §2 strings, bin edges, segment split points.

Expected strings are written out by hand from real records' fields, never produced by the code
under test.
"""

import dataclasses
import json
import string
from pathlib import Path

import pytest

from mfjax.data import weibo
from mfjax.data.events import Agent
from mfjax.sim import templates

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RUMDECT_TEST = DATA / "weibo" / "test"

INSTRUCTION = "根据其他网友的评论情况，请推测该网友可能的情绪、观点和立场，模拟该网友进行转发微博或评论："
UNKNOWN_STATE = "来自未知地区，描述为未知的未知性别网友，朋友数量未知，影响力未知，动态互动情况为未知，认证情况未知。"


def _agent(**profile):
    return Agent(uid="1", time=0.0, action="a", **profile)


def _real_agent(file_name: str, index: int):
    path = RUMDECT_TEST / file_name
    if not path.exists():
        pytest.skip(f"shared data sample {path} is not available")
    record = json.loads(path.read_text(encoding="utf-8"))[index]
    event = weibo.read_rumdect_event(path)
    agent, = [a for a in event.agents if a.uid == str(record["uid"]) and a.time == record["t"]]
    return event, record, agent


# ---------------------------------------------------------------- state text


def test_state_text_real_unverified_record():
    _, record, agent = _real_agent("3476055656644087.json", 2)
    assert (record["user_location"], record["gender"], record["friends_count"],
            record["followers_count"], record["verified"]) == ("湖北 武汉", "m", 477, 587, False)
    assert templates.state_text(agent) == ("来自湖北 武汉，描述为八九年，一个新时代拉开序幕...的男性网友，"
                                   "朋友数量适中，影响力适中，动态互动情况为不活跃，非认证用户。")


def test_state_text_real_verified_record():
    _, record, agent = _real_agent("3478206348931968.json", 14)
    # friends 2823, followers 22695, reposts 18 + comments 6 + attitudes 0, verified type 0.
    assert (record["friends_count"], record["followers_count"], record["verified_type"]) == \
        (2823, 22695, 0)
    assert templates.state_text(agent) == ("来自北京 朝阳区，描述为善未易明 理未易察的男性网友，朋友数量较多，"
                                   "影响力非常大，动态互动情况为较活跃，认证用户（类型0）。")


def test_state_text_real_empty_description_and_female():
    _, record, agent = _real_agent("3476055656644087.json", 1)
    assert record["user_description"] == "" and record["gender"] == "f"
    assert templates.state_text(agent) == ("来自江苏 南京，描述为未知的女性网友，朋友数量适中，影响力适中，"
                                   "动态互动情况为不活跃，非认证用户。")


def test_state_text_unknown_profile():
    assert templates.state_text(_agent()) == UNKNOWN_STATE
    assert templates.state_text(_agent(), language="en") == (
        "A user from an unknown region, gender: unknown, described as unknown; number of "
        "friends: unknown; influence: unknown; activity: unknown; verification unknown.")
    assert "认证用户（类型未知）" in templates.state_text(_agent(verified=True))


@pytest.mark.parametrize("count, word", [
    (0, "非常少"), (9, "非常少"), (10, "较少"), (30, "较少"), (31, "适中"), (1000, "适中"),
    (1001, "较多"), (3000, "较多"), (3001, "非常多")])
def test_friends_bins(count, word):
    assert f"朋友数量{word}，" in templates.state_text(_agent(friends_count=count))


@pytest.mark.parametrize("count, word", [
    (0, "非常小"), (99, "非常小"), (100, "较小"), (500, "较小"), (501, "适中"), (1000, "适中"),
    (1001, "较大"), (10000, "较大"), (10001, "非常大")])
def test_influence_bins(count, word):
    assert f"影响力{word}，" in templates.state_text(_agent(followers_count=count))


@pytest.mark.parametrize("counts, word", [
    ((0, 0, 0), "不活跃"), ((3, 3, 3), "不活跃"), ((4, 3, 3), "较活跃"), ((50, 50, 0), "较活跃"),
    ((50, 50, 1), "非常活跃"), ((None, 10, None), "较活跃")])
def test_activity_bins(counts, word):
    agent = _agent(reposts_count=counts[0], comments_count=counts[1], attitudes_count=counts[2])
    assert f"动态互动情况为{word}，" in templates.state_text(agent)


def test_gender_rule():
    assert "的男性网友" in templates.state_text(_agent(gender="m"))
    assert "的女性网友" in templates.state_text(_agent(gender="f"))
    # SPEC: 'm' is male, any other known value female.
    assert "的女性网友" in templates.state_text(_agent(gender="n"))


# ---------------------------------------------------------------- policy prompt


def test_policy_prompt_mf_real_record():
    event, record, agent = _real_agent("3476055656644087.json", 2)
    state = ("来自湖北 武汉，描述为八九年，一个新时代拉开序幕...的男性网友，朋友数量适中，影响力适中，"
             "动态互动情况为不活跃，非认证用户。")
    m = "大部分网友支持刘翔"
    segments = templates.policy_segments(event.topic, templates.state_text(agent), templates.mf_context(m))
    prefix = ("当前讨论的话题是：" + record_topic(event)
              + "重点参考已有的网友们评论情况：大部分网友支持刘翔。\n网友资料：")
    assert segments == (prefix, state + "\n" + INSTRUCTION)
    assert templates.full_text(segments) == prefix + state + "\n" + INSTRUCTION


def record_topic(event):
    raw = json.loads(Path(event.source_path).read_text(encoding="utf-8"))
    return raw[0]["text"]


def test_policy_prompt_state_and_empty_mean_field():
    assert templates.policy_segments("话题", "状态") == ("当前讨论的话题是：话题网友资料：",
                                                "状态\n" + INSTRUCTION)
    # While m is empty the MF prompt equals the state-only prompt (no "情况：。").
    assert templates.mf_context("") == ""
    assert templates.group_context("mf", m="") == templates.group_context("state") == ""
    sft = templates.policy_segments("话题", "状态", state_sft=True)
    assert sft[1] == "状态\n根据上述信息，模仿该网友进行转发微博或评论："


def test_recent_context_last_five():
    past = [f"c{i}" for i in range(1, 8)]
    assert templates.recent_context(past) == (
        "最新的网友评论如下：第1位网友评论：c3。\n第2位网友评论：c4。\n第3位网友评论：c5。\n"
        "第4位网友评论：c6。\n第5位网友评论：c7。\n")
    assert templates.recent_context([]) == ""
    assert templates.recent_context(["x", "y"]) == "最新的网友评论如下：第1位网友评论：x。\n第2位网友评论：y。\n"
    assert templates.group_context("recent", past_actions=past) == templates.recent_context(past)


def test_popular_context_top_followers_in_last_thirty():
    past = [f"c{i}" for i in range(35)]
    followers = [0] * 35
    followers[0] = 10 ** 6  # outside the window of the last 30
    followers[10], followers[20], followers[30] = 500, 900, 700
    followers[12] = None
    assert templates.popular_context(past, followers) == (
        "当前最热门的评论如下：第1位网友评论：c20。\n第2位网友评论：c30。\n第3位网友评论：c10。\n"
        "第4位网友评论：c5。\n第5位网友评论：c6。\n")
    assert templates.popular_context([], []) == ""
    with pytest.raises(ValueError):
        templates.popular_context(["a"], [])
    with pytest.raises(ValueError, match="unknown algorithm"):
        templates.group_context("rag")


def test_policy_prompt_recent_full_text():
    context = templates.recent_context(["真的假的？", "求真相"])
    text = templates.full_text(templates.policy_segments("T", "S", context))
    assert text == ("当前讨论的话题是：T最新的网友评论如下：第1位网友评论：真的假的？。\n"
                    "第2位网友评论：求真相。\n网友资料：S\n" + INSTRUCTION)


# ---------------------------------------------------------------- mean-field prompt


MF_INSTRUCTION = (
    "请你结合以上信息，总结网友的评论分布情况，方便后续网友快速了解已有讨论内容，对以下 6 个方面，"
    "根据重要性的顺序进行回答：1. 立场分布：大部分网友们是持有反对意见，还是支持？2. 观点分布：网友们有"
    "哪些观点？请总结主要的观点内容3. 情绪分布：大部分网友是生气、兴奋、质疑、焦虑?是积极倾向、消极，"
    "还是中立？4. 行为分布：他们更倾向于转发，还是评论？5. 话题真实性：网友们如何评价该话题的真实性？"
    "网友们是相信，还是质疑？6. 发言意图：网友的评论主要是提问、发表个人观点，还是转播信息？任务：请使用"
    " 200 字左右的中文总结回答，并确保信息结构清晰、简洁明了。")


def test_mean_field_prompt_real_actions():
    event, _, _ = _real_agent("3476055656644087.json", 2)
    actions = [a.action for a in event.agents[:3]]
    assert actions == ["转发微博。", "太捧翔哥了吧。。。", "转发微博"]
    segments = templates.mean_field_segments(event.topic, "", actions)
    head = "当前话题：" + record_topic(event) + "\n过往网友评论总结：。\n最新网友讨论情况：\n"
    assert segments == (head, "第1个网友评论：转发微博。\n", "第2个网友评论：太捧翔哥了吧。。。\n",
                        "第3个网友评论：转发微博\n", "\n" + MF_INSTRUCTION)
    assert templates.full_text(segments) == "".join(segments)


def test_mean_field_prompt_with_states_and_previous_summary():
    segments = templates.mean_field_segments("T", "之前的总结", ["好"], ["状态"])
    assert segments == ("当前话题：T\n过往网友评论总结：之前的总结。\n最新网友讨论情况：\n",
                        "第1个网友的个人资料：状态\n该网友的评论：好。\n", "\n" + MF_INSTRUCTION)
    with pytest.raises(ValueError):
        templates.mean_field_segments("T", "", ["a", "b"], ["s"])


def test_mean_field_instruction_six_aspects_in_order():
    text = templates.mean_field_instruction()
    assert text == MF_INSTRUCTION
    positions = [text.index(w) for w in ("立场", "观点分布", "情绪", "行为", "真实性", "意图")]
    assert positions == sorted(positions)
    en = templates.mean_field_instruction(language="en")
    positions = [en.index(w) for w in ("Stance", "Opinions", "Emotion", "Behaviour",
                                       "Perceived truth", "Intent")]
    assert positions == sorted(positions) and "200 words" in en


# ---------------------------------------------------------------- languages


def _fields(template: str) -> set:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_english_templates_mirror_chinese():
    for field in dataclasses.fields(templates.TemplateSet):
        zh, en = getattr(templates.ZH, field.name), getattr(templates.EN, field.name)
        if isinstance(zh, str):
            assert _fields(zh) == _fields(en), field.name
        elif isinstance(zh, tuple):
            assert [b for b, _ in zh] == [b for b, _ in en], field.name


def test_english_prompts():
    policy = templates.full_text(templates.policy_segments("Topic", "State", templates.mf_context("m", language="en"),
                                           language="en"))
    assert policy == ("The topic under discussion: Topic\nAbove all, take into account how users "
                      "have commented so far: m.\nUser profile: State\nBased on how other users "
                      "have commented, infer this user's likely emotion, opinion and stance, and "
                      "write the repost or comment this user would post: ")
    segments = templates.mean_field_segments("Topic", "", ["hi"], language="en")
    assert segments[:2] == ("Current topic: Topic\nSummary of earlier comments: .\n"
                            "Latest discussion:\n", "Comment of user 1: hi\n")
    with pytest.raises(ValueError, match="no prompt templates"):
        templates.templates_for("fr")
