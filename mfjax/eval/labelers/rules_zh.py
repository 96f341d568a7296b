"""Chinese rule labeler (EVALUATION.md §3): a transparent stack of emoticons, lexicons and cue words.

Order of evidence, per comment:
1. the plain-repost rule (§1) → fixed labels, no lexicon;
2. tendency = ±2 per emoticon by valence + ±1.5 per emotion cue + ±1 per DUTIR word (乐 好 positive;
   怒 哀 惧 恶 negative), neutral band ±0.5; pysenti's score decides only when none of these fire, with
   a wide band ±3.5 (see `PYSENTI_BAND` for why);
3. state = Weibo emoticons (weight 3) > cue patterns (2) > DUTIR emotion words (1), else calm;
4. counter-rumour and doubt cues → rumor / belief; stance = doubt → oppose, positive → support, else
   neutral (rules cannot read the claim: these three dimensions are judge-only until validated);
5. intent = promotion cues, else question cues, else opinion; subjective on any emotion evidence or
   first-person / exclamation cues;
6. keywords = jieba TF-IDF top 3 of the own words, emoticons, mentions, URLs and chain removed.

Everything that decides a label is in `mfjax/eval/lexicons/` (emoticons_zh.json, cues_zh.json) or
named here; the labeler's version carries the package versions and the lexicon hash.
"""

from __future__ import annotations

import logging
import re

from mfjax.eval import lexicons, schema
from mfjax.eval.labelers.base import Population
from mfjax.eval.text import is_plain_repost, own_text, remove_urls

logger = logging.getLogger(__name__)

# Bump when a rule changes (the version string, and so every cache key, changes with it).
RULES_VERSION = 1
W_EMOTICON, W_CUE, W_LEXICON = 3.0, 2.0, 1.0
EMOTICON_POLARITY = 2.0  # per emoticon, times its valence
CUE_POLARITY = 1.5  # per state whose cue matched: happy +, angry / sad / fear -, surprise 0
LEXICON_POLARITY = 1.0  # per DUTIR word
NEUTRAL_BAND = 0.5
# EVALUATION.md §3 adds the pysenti score to the emoticon valence with a ±0.5 band. On development
# comments (CED events outside the validation sample) pysenti's dictionary scored function words
# and neutral nouns at ±1–3 (啊 −1.6, 授予 +2.9, 焖 +0.9), so plain statements came out polar. Here
# it is a fallback for texts without emoticon, cue or DUTIR evidence, with a wide band.
PYSENTI_BAND = 3.5
CUE_VALENCE = {"happy": 1, "angry": -1, "sad": -1, "fear": -1, "surprise": 0}
DUTIR_POLARITY = {"乐": 1, "好": 1, "怒": -1, "哀": -1, "惧": -1, "恶": -1}
# DUTIR's seven categories onto the six states. 好 (praise / trust) is an evaluation rather than an
# emotion and fired on most texts in development material, so it casts no state vote.
DUTIR_STATES = {"乐": "happy", "怒": "angry", "恶": "angry", "哀": "sad", "惧": "fear", "惊": "surprise"}
DUTIR_FILE = "zh_common_DUTIR.yaml"
# Ties between states go to the first in this order (strong negative emotions first).
STATE_PRIORITY = ("angry", "sad", "fear", "surprise", "happy")
KEYWORDS_TOP = 3

_BRACKET = re.compile(r"\[([^\[\]\s]{1,8})\]")
_MENTION = re.compile(r"@[^\s@:：,，.。!！?？;；/()（）\[\]【】\"'“”]+")
_QUESTION_FORM = re.compile(r"难道|是不是|是否|[吗么嘛][？?！!。~～]*$|[？?]")


def _version(package: str) -> str:
    return lexicons.package_version(package) or "absent"


class ZhRules:
    """The Chinese rule labeler (name "rules", language "zh")."""

    name = "rules"
    language = "zh"

    def __init__(self):
        emo = lexicons.load("emoticons_zh.json")
        cues = lexicons.load("cues_zh.json")
        self._bracket = {k: tuple(v) for k, v in emo["bracket"].items()}
        self._kaomoji = {k: tuple(v) for k, v in emo["kaomoji"].items()}
        self._state_cues = {s: lexicons.compile_any(p) for s, p in cues["state"].items()}
        self._counter = lexicons.compile_any(cues["counter"])
        self._doubt = lexicons.compile_any(cues["doubt"])
        self._not_counter = lexicons.compile_any(cues["not_counter"])
        self._doubt_not_counter = lexicons.compile_any(cues["doubt_not_counter"])
        self._question = lexicons.compile_any(cues["question"])
        self._promotion = lexicons.compile_any(cues["promotion"])
        self._spread_only = lexicons.compile_any(cues["spread_only"])
        self._subjective = lexicons.compile_any(cues["subjective"])
        dutir = lexicons.cntext_dictionary(DUTIR_FILE)
        if dutir is None:
            logger.warning("cntext is not installed: the zh rules run without the DUTIR lexicon "
                           "(pip install --no-deps cntext)")
        # Words about truth (谣言, 辟谣, 证实 …) sit in DUTIR's 恶 / 好 classes but belong to the belief
        # dimension, not to emotion: they cast no state or polarity vote.
        ignore = set(cues.get("dutir_ignore", ()))
        dutir = {c: [w for w in ws if w not in ignore] for c, ws in dutir.items()} if dutir else None
        self._dutir = lexicons.word_to_states(dutir, DUTIR_STATES, min_len=2)
        self._dutir_polarity = {w: sum(DUTIR_POLARITY[c] for c in cats)
                                for w, cats in lexicons.word_to_states(
                                    dutir, {c: c for c in DUTIR_POLARITY}, min_len=2).items()}
        self._dutir_tag = f"cntext-{lexicons.cntext_version()}" if dutir else "absent"
        self._pysenti = None
        self._jieba = None

    @property
    def version(self) -> str:
        """Rule code version, package versions and lexicon hash."""
        return (f"rules-zh/{RULES_VERSION} pysenti={_version('pysenti')} jieba={_version('jieba')} "
                f"dutir={self._dutir_tag} lex={lexicons.files_hash('emoticons_zh.json', 'cues_zh.json')}")

    def _load(self):
        if self._jieba is None:
            import jieba
            import jieba.analyse
            from pysenti import rule_classifier

            jieba.setLogLevel(logging.WARNING)
            self._jieba, self._pysenti = jieba, rule_classifier

    def label(self, population: Population) -> dict:
        """Labels of every comment of the population, keyed by id."""
        return {c.id: self.label_text(c.text, population.topic) for c in population.comments}

    def emoticons(self, text: str) -> list:
        """(state, valence) of each emoticon in the text, in order."""
        found = [self._bracket[m.group(1)] for m in _BRACKET.finditer(text) if m.group(1) in self._bracket]
        found += [v for k, v in self._kaomoji.items() if k in text]
        return found

    def polarity(self, text: str) -> float:
        """pysenti's polarity score of a text (0 for an empty one)."""
        self._load()
        return float(self._pysenti.classify(text)["score"]) if text.strip() else 0.0

    def label_text(self, text: str, topic: str = "") -> dict:
        """The 9 labels of one comment."""
        if is_plain_repost(text, "zh"):
            return dict(schema.PLAIN_REPOST_LABELS, keywords=[])
        self._load()
        own = _MENTION.sub(" ", own_text(text, "zh"))
        emos = self.emoticons(own)
        words_only = remove_urls(_BRACKET.sub(" ", own)).strip()

        # State: weighted votes; the strongest wins, calm when nothing votes.
        votes = dict.fromkeys(STATE_PRIORITY, 0.0)
        polarity = EMOTICON_POLARITY * sum(v for _, v in emos)
        for state, _ in emos:
            if state in votes:  # a calm emoticon (思考, 围观) votes for no emotion
                votes[state] += W_EMOTICON
        for state, pattern in self._state_cues.items():
            if pattern.search(words_only):
                votes[state] += W_CUE
                polarity += CUE_POLARITY * CUE_VALENCE[state]
        tokens = self._jieba.lcut(words_only) if words_only else []
        evidence = bool(emos) or polarity != 0
        for token in tokens:
            for state in self._dutir.get(token, ()):
                votes[state] += W_LEXICON
            if token in self._dutir_polarity:
                polarity += LEXICON_POLARITY * self._dutir_polarity[token]
                evidence = True
        emotional = any(v > 0 for v in votes.values())
        state = max(STATE_PRIORITY, key=lambda s: (votes[s], -STATE_PRIORITY.index(s))) if emotional else "calm"

        # Tendency: the evidence above, else pysenti with a wide band.
        band = NEUTRAL_BAND
        if not evidence:
            polarity, band = self.polarity(words_only), PYSENTI_BAND
        tendency = "positive" if polarity > band else "negative" if polarity < -band else "neutral"

        # Rumour and belief: counter cues push back; a counter cue inside a question only doubts.
        negated = bool(self._not_counter.search(own))
        counter_hit = bool(self._counter.search(own)) and not negated
        doubt_hit = bool(self._doubt.search(own)) and not negated
        # Asking for a debunk (求辟谣, 坐等辟谣) doubts the claim without countering it.
        counter = (counter_hit and not _QUESTION_FORM.search(own)
                   and not self._doubt_not_counter.search(own))
        doubt = counter_hit or doubt_hit
        stance = "oppose" if doubt else "support" if tendency == "positive" else "neutral"

        # Behaviour: only calls to spread (扩散, 转起 …) and emoticons → share.
        rest = self._spread_only.sub("", words_only)
        share = bool(self._spread_only.search(words_only)) and not re.sub(r"[\W_]+", "", rest)

        if share or self._promotion.search(own):
            intent = "promotion"
        elif self._question.search(own):
            intent = "question"
        else:
            intent = "opinion"
        subjective = emotional or tendency != "neutral" or bool(self._subjective.search(own))

        return {
            "rumor": "counter" if counter else "spread",
            "sentiment_state": state,
            "sentiment_tendency": tendency,
            "behavior_type": "share" if share else "comment",
            "stance": stance,
            "belief_degree": "doubt" if doubt else "believe",
            "subjectivity": "subjective" if subjective and not share else "objective",
            "intent": intent,
            "keywords": self.keywords(words_only),
        }

    def keywords(self, text: str) -> list:
        """jieba TF-IDF top keywords of a cleaned text."""
        if not text:
            return []
        self._load()
        return list(self._jieba.analyse.extract_tags(text, topK=KEYWORDS_TOP))
