"""Prompt TEXT of MF-LLM (SPEC §2): the agent state, the policy prompt and the mean-field prompt.

Text only; `mfjax.sim.prompts` turns these segments into tokens. Every prompt is returned as a tuple
of text segments whose concatenation (`full_text`) is the whole prompt, split where the token-space
code shares work:

- policy prompt: (shared prefix, agent part). The prefix = topic + group context + "网友资料：" is
  the same for every agent of a step (prefilled once); the agent part = state + "\\n" + instruction.
- mean-field prompt: (head with topic and m_prev, one segment per agent line, ..., tail with the
  summary instruction).

The Chinese strings reproduce SPEC §2 byte for byte; the English ones are faithful translations for
English datasets. Choices where SPEC leaves room (each documented at its constant):

- Agents numbered from 1 in "第{i}个网友评论" and "第{i}位网友评论", as in the public reference code.
- Missing or empty profile values are written as explicit "unknown" words (an empty description is
  "未知" as SPEC says; the reference wrote it literally, giving "描述为的"). An agent with no profile
  at all reads "来自未知地区，描述为未知的未知性别网友，朋友数量未知，影响力未知，动态互动情况为未知，认证情况未知。"
- SPEC writes "认证用户（类型{verified_type}）" without the space the reference code has; SPEC wins.
- The follower bin 100 is "较小" as SPEC states (the reference's `101 <= f` sent exactly 100 to
  "非常大").
- The mean-field context is left out while m is empty (the reference also adds it only when
  m != ""), so the first step's MF prompt equals the state-only prompt instead of reading
  "…评论情况：。".
- The summary instruction is the reference code's own wording (mf_llm/mean_field_utils/
  update_prompt.py in the public reference repository).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

# Bins are (exclusive upper bound, word) pairs checked in order, then the fallback word. With
# integer counts, "value < 31" is SPEC's "10–30" bin, and so on.
Bins = tuple


@dataclasses.dataclass(frozen=True)
class TemplateSet:
    """All prompt strings of one language."""

    language: str
    # --- agent state ---
    state: str  # fields: location, description, gender, friends, influence, activity, verification
    gender_male: str
    gender_female: str
    gender_unknown: str
    friends_bins: Bins
    friends_top: str
    influence_bins: Bins
    influence_top: str
    activity_bins: Bins
    activity_top: str
    unknown_location: str
    unknown_description: str
    unknown_level: str  # for F / I / A when the counts are unknown
    verified: str  # field: verified_type
    verified_type_unknown: str
    unverified: str
    verification_unknown: str
    # --- policy prompt ---
    topic: str
    mf_context: str
    recent_header: str
    popular_header: str
    comment_line: str  # fields: i, comment
    profile: str
    instruction: str
    state_sft_instruction: str
    # --- mean-field prompt ---
    mf_head: str  # fields: topic, m_prev
    mf_agent_line: str  # fields: i, action
    mf_agent_state_line: str  # fields: i, state, action
    mf_instruction: str


ZH = TemplateSet(
    language="zh",
    state=("来自{location}，描述为{description}的{gender}网友，朋友数量{friends}，影响力{influence}，"
           "动态互动情况为{activity}，{verification}。"),
    gender_male="男性",
    gender_female="女性",
    gender_unknown="未知性别",
    friends_bins=((10, "非常少"), (31, "较少"), (1001, "适中"), (3001, "较多")),
    friends_top="非常多",
    influence_bins=((100, "非常小"), (501, "较小"), (1001, "适中"), (10001, "较大")),
    influence_top="非常大",
    activity_bins=((10, "不活跃"), (101, "较活跃")),
    activity_top="非常活跃",
    # "未知地区" is the reference code's own default for a missing location.
    unknown_location="未知地区",
    unknown_description="未知",
    unknown_level="未知",
    verified="认证用户（类型{verified_type}）",
    verified_type_unknown="未知",
    unverified="非认证用户",
    verification_unknown="认证情况未知",
    topic="当前讨论的话题是：{topic}",
    mf_context="重点参考已有的网友们评论情况：{m}。\n",
    recent_header="最新的网友评论如下：",
    popular_header="当前最热门的评论如下：",
    comment_line="第{i}位网友评论：{comment}。\n",
    profile="网友资料：",
    instruction="根据其他网友的评论情况，请推测该网友可能的情绪、观点和立场，模拟该网友进行转发微博或评论：",
    # The reference's instruction for the state-only SFT baseline.
    state_sft_instruction="根据上述信息，模仿该网友进行转发微博或评论：",
    mf_head="当前话题：{topic}\n过往网友评论总结：{m_prev}。\n最新网友讨论情况：\n",
    mf_agent_line="第{i}个网友评论：{action}\n",
    # With states: the reference's (commented-out) per-agent line.
    mf_agent_state_line="第{i}个网友的个人资料：{state}\n该网友的评论：{action}。\n",
    mf_instruction=(
        "请你结合以上信息，总结网友的评论分布情况，方便后续网友快速了解已有讨论内容，"
        "对以下 6 个方面，根据重要性的顺序进行回答："
        "1. 立场分布：大部分网友们是持有反对意见，还是支持？"
        "2. 观点分布：网友们有哪些观点？请总结主要的观点内容"
        "3. 情绪分布：大部分网友是生气、兴奋、质疑、焦虑?是积极倾向、消极，还是中立？"
        "4. 行为分布：他们更倾向于转发，还是评论？"
        "5. 话题真实性：网友们如何评价该话题的真实性？网友们是相信，还是质疑？"
        "6. 发言意图：网友的评论主要是提问、发表个人观点，还是转播信息？"
        "任务：请使用 200 字左右的中文总结回答，并确保信息结构清晰、简洁明了。"),
)

EN = TemplateSet(
    language="en",
    state=("A user from {location}, gender: {gender}, described as {description}; number of "
           "friends: {friends}; influence: {influence}; activity: {activity}; {verification}."),
    gender_male="male",
    gender_female="female",
    gender_unknown="unknown",
    friends_bins=((10, "very few"), (31, "few"), (1001, "moderate"), (3001, "many")),
    friends_top="very many",
    influence_bins=((100, "very small"), (501, "small"), (1001, "moderate"), (10001, "large")),
    influence_top="very large",
    activity_bins=((10, "inactive"), (101, "fairly active")),
    activity_top="very active",
    unknown_location="an unknown region",
    unknown_description="unknown",
    unknown_level="unknown",
    verified="a verified user (type {verified_type})",
    verified_type_unknown="unknown",
    unverified="an unverified user",
    verification_unknown="verification unknown",
    # The Chinese prompt runs the topic straight into the context (as the reference does); the
    # English one breaks the line, which reads naturally and changes no split point.
    topic="The topic under discussion: {topic}\n",
    mf_context="Above all, take into account how users have commented so far: {m}.\n",
    recent_header="The latest user comments: ",
    popular_header="The most popular comments right now: ",
    comment_line="User {i} commented: {comment}.\n",
    profile="User profile: ",
    instruction=("Based on how other users have commented, infer this user's likely emotion, "
                 "opinion and stance, and write the repost or comment this user would post: "),
    state_sft_instruction="Based on the above, write the repost or comment this user would post: ",
    mf_head=("Current topic: {topic}\nSummary of earlier comments: {m_prev}.\n"
             "Latest discussion:\n"),
    mf_agent_line="Comment of user {i}: {action}\n",
    mf_agent_state_line="Profile of user {i}: {state}\nThis user's comment: {action}.\n",
    mf_instruction=(
        "Using the information above, summarise how the users' comments are distributed, so that "
        "later users can quickly grasp the discussion so far. Answer on the following 6 aspects, "
        "in order of importance: "
        "1. Stance: do most users oppose or support? "
        "2. Opinions: which opinions do users hold? Summarise the main ones. "
        "3. Emotion: are most users angry, excited, doubtful, anxious? Positive, negative or "
        "neutral? "
        "4. Behaviour: do they tend to repost or to comment? "
        "5. Perceived truth: how do users judge the truth of the topic? Do they believe it or "
        "doubt it? "
        "6. Intent: are the comments mainly questions, personal opinions, or relayed information? "
        "Task: answer with a summary of about 200 words, clearly structured, concise and clear."),
)

TEMPLATES = {"zh": ZH, "en": EN}

# Group-context algorithms (SPEC §2): which context the policy prompt carries.
ALGORITHMS = ("mf", "state", "state_sft", "recent", "popular")
RECENT_K = 5
POPULAR_K = 5
POPULAR_WINDOW = 30


def templates_for(language: str) -> TemplateSet:
    """The template set of a language ('zh' or 'en')."""
    try:
        return TEMPLATES[language]
    except KeyError:
        raise ValueError(f"no prompt templates for language {language!r}; have "
                         f"{sorted(TEMPLATES)}") from None


def full_text(segments: Sequence[str]) -> str:
    """The whole prompt: the concatenation of its segments."""
    return "".join(segments)


def _bin(value: int, bins: Bins, top: str) -> str:
    for bound, word in bins:
        if value < bound:
            return word
    return top


def _known(text: Optional[str]) -> bool:
    return text is not None and text.strip() != ""


def state_text(agent, *, language: str = "zh") -> str:
    """The agent's state sentence (SPEC §2), with explicit "unknown" words for missing fields.

    `agent` is a `mfjax.data.events.Agent` (anything with its profile attributes). Gender: 'm' →
    male, any other known value → female (SPEC), None → unknown. Activity sums the known counts
    of reposts, comments and attitudes; it is unknown only when all three are.
    """
    t = templates_for(language)
    location = agent.user_location if _known(agent.user_location) else t.unknown_location
    description = (agent.user_description if _known(agent.user_description)
                   else t.unknown_description)
    if agent.gender is None:
        gender = t.gender_unknown
    else:
        gender = t.gender_male if agent.gender == "m" else t.gender_female
    friends = (t.unknown_level if agent.friends_count is None
               else _bin(agent.friends_count, t.friends_bins, t.friends_top))
    influence = (t.unknown_level if agent.followers_count is None
                 else _bin(agent.followers_count, t.influence_bins, t.influence_top))
    counts = [c for c in (agent.reposts_count, agent.comments_count, agent.attitudes_count)
              if c is not None]
    activity = (t.unknown_level if not counts
                else _bin(sum(counts), t.activity_bins, t.activity_top))
    if agent.verified is None:
        verification = t.verification_unknown
    elif agent.verified:
        vtype = t.verified_type_unknown if agent.verified_type is None else agent.verified_type
        verification = t.verified.format(verified_type=vtype)
    else:
        verification = t.unverified
    return t.state.format(location=location, description=description, gender=gender,
                          friends=friends, influence=influence, activity=activity,
                          verification=verification)


def mf_context(m: str, *, language: str = "zh") -> str:
    """MF-LLM group context "重点参考已有的网友们评论情况：{m}。\\n"; empty while m is empty."""
    if m == "":
        return ""
    return templates_for(language).mf_context.format(m=m)


def _comment_list(header: str, comments: Sequence[str], t: TemplateSet) -> str:
    if not comments:
        return ""
    return header + "".join(t.comment_line.format(i=i, comment=c)
                            for i, c in enumerate(comments, start=1))


def recent_context(past_actions: Sequence[str], *, k: int = RECENT_K,
                   language: str = "zh") -> str:
    """`recent` baseline context: the last k actions, oldest first; empty when there are none."""
    t = templates_for(language)
    return _comment_list(t.recent_header, list(past_actions)[-k:] if k else [], t)


def popular_context(past_actions: Sequence[str], followers: Sequence[Optional[int]], *,
                    k: int = POPULAR_K, window: int = POPULAR_WINDOW,
                    language: str = "zh") -> str:
    """`popular` baseline context: the k actions with most followers among the last `window`.

    Ties (and unknown follower counts, ranked lowest) keep time order, earliest first, which is
    also what the reference did in effect (its sort key was missing, so all were ties).
    """
    if len(past_actions) != len(followers):
        raise ValueError("past_actions and followers must have the same length")
    t = templates_for(language)
    start = max(len(past_actions) - window, 0)
    recent = list(zip(past_actions[start:], followers[start:]))
    ranked = sorted(recent, key=lambda af: -1 if af[1] is None else af[1], reverse=True)
    # sorted(reverse=True) keeps ties in their original order (Python's sort is stable).
    return _comment_list(t.popular_header, [a for a, _ in ranked[:k]], t)


def group_context(algorithm: str, *, m: str = "", past_actions: Sequence[str] = (),
                  past_followers: Optional[Sequence[Optional[int]]] = None,
                  language: str = "zh") -> str:
    """The group context of an algorithm in `ALGORITHMS` (SPEC §2 baselines share the loop).

    mf: the mean field m; state / state_sft: none; recent: the last actions; popular: the most
    followed of the last actions (`past_followers` aligned with `past_actions`).
    """
    if algorithm == "mf":
        return mf_context(m, language=language)
    if algorithm in ("state", "state_sft"):
        return ""
    if algorithm == "recent":
        return recent_context(past_actions, language=language)
    if algorithm == "popular":
        if past_followers is None:
            past_followers = [None] * len(past_actions)
        return popular_context(past_actions, past_followers, language=language)
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")


def policy_prefix(topic: str, context: str = "", *, language: str = "zh") -> str:
    """Shared prefix of the policy prompt: topic + group context + the profile label."""
    t = templates_for(language)
    return t.topic.format(topic=topic) + context + t.profile


def policy_agent_part(state: str, *, language: str = "zh", state_sft: bool = False) -> str:
    """Per-agent part of the policy prompt: state + "\\n" + instruction."""
    t = templates_for(language)
    return state + "\n" + (t.state_sft_instruction if state_sft else t.instruction)


def policy_segments(topic: str, state: str, context: str = "", *, language: str = "zh",
                    state_sft: bool = False) -> tuple:
    """(shared prefix, agent part) of one agent's policy prompt.

    `context` is the group context: `mf_context(m)`, `recent_context(...)`, `popular_context(...)`,
    or "" for the state-only baselines. `state_sft` selects the state-SFT baseline's instruction.
    """
    return (policy_prefix(topic, context, language=language),
            policy_agent_part(state, language=language, state_sft=state_sft))


def mean_field_segments(topic: str, m_prev: str, actions: Sequence[str],
                        states: Optional[Sequence[str]] = None, *,
                        language: str = "zh") -> tuple:
    """(head, one line per agent..., tail) of the mean-field prompt; agents numbered from 1.

    With `states`, each agent line also carries the agent's state (the paper's μ takes states and
    actions; the reference's simulator passed actions only).
    """
    t = templates_for(language)
    head = t.mf_head.format(topic=topic, m_prev=m_prev)
    if states is None:
        lines = [t.mf_agent_line.format(i=i, action=a) for i, a in enumerate(actions, start=1)]
    else:
        if len(states) != len(actions):
            raise ValueError("states and actions must have the same length")
        lines = [t.mf_agent_state_line.format(i=i, state=s, action=a)
                 for i, (s, a) in enumerate(zip(states, actions), start=1)]
    return (head, *lines, mean_field_tail(language=language))


def mean_field_tail(*, language: str = "zh") -> str:
    """Tail of the mean-field prompt: a blank line, then the summary instruction."""
    return "\n" + templates_for(language).mf_instruction


def mean_field_instruction(*, language: str = "zh") -> str:
    """The summary instruction alone (the prompt of the IB-Tune prior r(m))."""
    return templates_for(language).mf_instruction
