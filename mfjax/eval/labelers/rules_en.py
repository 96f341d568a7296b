"""English rule labeler (EVALUATION.md §3): VADER, emoji and cue words, share detection within the population.

Per population (an event's tweets, or one world's generated comments):
1. the plain-repost rule (§1: only `RT @user: …`, or a copy of the topic) → fixed labels;
2. **share** = RT / via, or a URL plus a near-duplicate of the topic or of another comment of the
   population with at most one content word of its own (82 % of the Twitter events' tweets
   near-duplicate another one: headlines relayed with a link). A share is calm, neutral, objective,
   promotion; a share of the topic itself follows the topic (spread, believe);
3. otherwise tendency = VADER compound (its documented ±0.05 thresholds), state = emoji (weight 3) >
   cue patterns (2) > NRC emotion words from cntext (0.5 each, so one word alone does not decide),
   doubt / counter cues → belief, rumor; stance = doubt → oppose, positive → support, else neutral;
   subjectivity from emotion evidence and first-person cues, TextBlob's subjectivity as a tie-break;
   intent = question, else promotion (link / news cues without opinion), else opinion;
4. keywords: YAKE when installed, else stop-words + TF-IDF over the population, top 3.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import math
import re

from mfjax.eval import lexicons, schema
from mfjax.eval.labelers.base import Population
from mfjax.eval.text import is_plain_repost, own_text, remove_urls

logger = logging.getLogger(__name__)

RULES_VERSION = 1
W_EMOJI, W_CUE, W_LEXICON = 3.0, 2.0, 0.5
EMOTION_THRESHOLD = 1.0  # a state needs this many votes (one emoji, one cue, or two NRC words)
VADER_BAND = 0.05  # VADER's own thresholds for positive / negative
TEXTBLOB_SUBJECTIVE = 0.5
NEAR_DUP_CONTAINMENT = 0.8  # |A ∩ B| / min(|A|, |B|) over content words
NEAR_DUP_MIN_WORDS = 4
MAX_OWN_WORDS_IN_SHARE = 2  # headline variants add a site name or a word or two
KEYWORDS_TOP = 3
NRC_STATES = {"anger": "angry", "disgust": "angry", "joy": "happy", "sadness": "sad", "fear": "fear",
              "surprise": "surprise"}
NRC_FILE = "en_common_NRC.yaml"
STATE_PRIORITY = ("angry", "sad", "fear", "surprise", "happy")

_MENTION = re.compile(r"@\w+")
_FACT_CHECK = re.compile(r"snopes\.com|factcheck\.org|politifact\.com|hoax-slayer", re.I)
_WORD = re.compile(r"[a-z][a-z'’]+")


def _version(package: str) -> str:
    return lexicons.package_version(package) or "absent"


class EnRules:
    """The English rule labeler (name "rules", language "en")."""

    name = "rules"
    language = "en"

    def __init__(self):
        emo = lexicons.load("emoticons_en.json")
        cues = lexicons.load("cues_en.json")
        self._emoji = {k: tuple(v) for k, v in emo["emoji"].items()}
        self._ascii = {k: tuple(v) for k, v in emo["ascii"].items()}
        self._ascii_re = re.compile(r"(?:^|(?<=\s))(" + "|".join(re.escape(k) for k in self._ascii) + r")(?=\s|$)")
        self._state_cues = {s: lexicons.compile_any(p) for s, p in cues["state"].items()}
        self._counter = lexicons.compile_any(cues["counter"])
        self._doubt = lexicons.compile_any(cues["doubt"])
        self._not_counter = lexicons.compile_any(cues["not_counter"])
        self._doubt_not_counter = lexicons.compile_any(cues["doubt_not_counter"])
        self._question = lexicons.compile_any(cues["question"])
        self._promotion = lexicons.compile_any(cues["promotion"])
        self._share = lexicons.compile_any(cues["share"])
        self._subjective = lexicons.compile_any(cues["subjective"])
        self._stop = frozenset(cues["stopwords"])
        nrc = lexicons.cntext_dictionary(NRC_FILE)
        if nrc is None:
            logger.warning("cntext is not installed: the en rules run without the NRC lexicon "
                           "(pip install --no-deps cntext)")
        self._nrc = lexicons.word_to_states(nrc, NRC_STATES, min_len=3)
        self._nrc_tag = f"cntext-{lexicons.cntext_version()}" if nrc else "absent"
        self._yake = importlib.util.find_spec("yake") is not None
        self._vader = None
        self._textblob = None

    @property
    def version(self) -> str:
        """Rule code version, package versions and lexicon hash."""
        kw = f"yake-{_version('yake')}" if self._yake else "tfidf"
        return (f"rules-en/{RULES_VERSION} vader={_version('vaderSentiment')} "
                f"textblob={_version('textblob')} nrc={self._nrc_tag} kw={kw} "
                f"lex={lexicons.files_hash('emoticons_en.json', 'cues_en.json')}")

    def _load(self):
        if self._vader is None:
            from textblob import TextBlob
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._vader, self._textblob = SentimentIntensityAnalyzer(), TextBlob

    def content_words(self, text: str) -> list:
        """Lower-case words of a text without URLs, mentions and stop words."""
        text = _MENTION.sub(" ", remove_urls(text)).lower().replace("#", " ")
        return [w for w in _WORD.findall(text) if w not in self._stop]

    def label(self, population: Population) -> dict:
        """Labels of every comment of the population, keyed by id (share detection compares them)."""
        self._load()
        comments = population.comments
        words = [set(self.content_words(own_text(c.text, "en"))) for c in comments]
        topic_words = set(self.content_words(population.topic))
        keywords = self._population_keywords([c.text for c in comments])
        out = {}
        for i, c in enumerate(comments):
            copies_topic = _near_duplicate(words[i], topic_words)
            source = topic_words if copies_topic else next(
                (words[j] for j in range(len(comments)) if j != i and _near_duplicate(words[i], words[j])), None)
            # A copy that adds a word of feeling ("So sad. <headline>") is a comment, not a share.
            copies_other = source is not None and not self._feeling(" ".join(words[i] - source))
            copies_topic = copies_topic and copies_other
            out[c.id] = self.label_text(c.text, population.topic, copies_topic=copies_topic,
                                        copies_other=copies_other, keywords=keywords[i])
        return out

    def label_text(self, text: str, topic: str = "", *, copies_topic: bool = False,
                   copies_other: bool = False, keywords=None) -> dict:
        """The 9 labels of one comment; `copies_*` say whether it near-duplicates the topic / others."""
        if is_plain_repost(text, "en", topic):
            return dict(schema.PLAIN_REPOST_LABELS, keywords=[])
        self._load()
        own = own_text(text, "en")
        words_only = _MENTION.sub(" ", remove_urls(own)).strip()
        has_url = bool(re.search(r"https?:|www\.", text, re.I))
        share = bool(self._share.search(text)) or (has_url and copies_other)
        keywords = self.keywords(words_only) if keywords is None else keywords

        # Cues are read in the words, not in links (a URL slug "...-rumors-..." is the site's word),
        # except a link to a fact-checking site, which is the sharer's own evidence.
        negated = bool(self._not_counter.search(words_only))
        counter_hit = (bool(self._counter.search(words_only)) or bool(_FACT_CHECK.search(text))) and not negated
        doubt = (counter_hit or bool(self._doubt.search(words_only))) and not negated
        counter = counter_hit and not self._doubt_not_counter.search(words_only)
        if share and copies_topic:
            # Relaying the topic itself: its cue words are the topic's, not the sharer's.
            counter = doubt = False
        if share:
            return {"rumor": "counter" if counter else "spread", "sentiment_state": "calm",
                    "sentiment_tendency": "neutral", "behavior_type": "share",
                    "stance": "oppose" if doubt else "neutral",
                    "belief_degree": "doubt" if doubt else "believe", "subjectivity": "objective",
                    "intent": "promotion", "keywords": keywords}

        votes = dict.fromkeys(STATE_PRIORITY, 0.0)
        for ch, (state, _) in self._emoji.items():
            if ch in own and state in votes:
                votes[state] += W_EMOJI
        for m in self._ascii_re.finditer(own):
            state = self._ascii[m.group(1)][0]
            if state in votes:
                votes[state] += W_EMOJI
        for state, pattern in self._state_cues.items():
            if pattern.search(words_only):
                votes[state] += W_CUE
        for w in _WORD.findall(words_only.lower()):
            for state in self._nrc.get(w, ()):
                votes[state] += W_LEXICON
        emotional = {s: v for s, v in votes.items() if v >= EMOTION_THRESHOLD}
        state = (max(emotional, key=lambda s: (votes[s], -STATE_PRIORITY.index(s)))
                 if emotional else "calm")

        compound = self._vader.polarity_scores(own)["compound"] if words_only else 0.0
        tendency = "positive" if compound >= VADER_BAND else "negative" if compound <= -VADER_BAND else "neutral"
        stance = "oppose" if doubt else "support" if tendency == "positive" else "neutral"

        subjective = bool(emotional) or bool(self._subjective.search(own))
        if not subjective and words_only:
            subjective = self._textblob(words_only).sentiment.subjectivity >= TEXTBLOB_SUBJECTIVE
        if self._question.search(words_only):
            intent = "question"
        elif self._promotion.search(own) and not subjective:
            intent = "promotion"
        else:
            intent = "opinion"
        return {"rumor": "counter" if counter else "spread", "sentiment_state": state,
                "sentiment_tendency": tendency, "behavior_type": "comment", "stance": stance,
                "belief_degree": "doubt" if doubt else "believe",
                "subjectivity": "subjective" if subjective else "objective", "intent": intent,
                "keywords": keywords}

    def _feeling(self, text: str) -> bool:
        """Whether words carry sentiment (VADER) or an emotion cue."""
        if not text:
            return False
        return (self._vader.polarity_scores(text)["compound"] != 0
                or any(p.search(text) for p in self._state_cues.values()))

    def keywords(self, text: str) -> list:
        """Keywords of one text alone (YAKE, or its most frequent content words)."""
        if self._yake:
            return self._yake_keywords(text)
        counts = collections.Counter(self.content_words(text))
        return [w for w, _ in counts.most_common(KEYWORDS_TOP)]

    def _yake_keywords(self, text: str) -> list:
        import yake

        if not text.strip():
            return []
        extractor = yake.KeywordExtractor(lan="en", n=1, top=KEYWORDS_TOP)
        return [k for k, _ in extractor.extract_keywords(text)]

    def _population_keywords(self, texts: list) -> list:
        """Top TF-IDF content words of each text, idf over the population (or YAKE per text)."""
        own = [_MENTION.sub(" ", remove_urls(own_text(t, "en"))) for t in texts]
        if self._yake:
            return [self._yake_keywords(t) for t in own]
        docs = [self.content_words(t) for t in own]
        df = collections.Counter(w for d in docs for w in set(d))
        n = len(docs)
        out = []
        for d in docs:
            tf = collections.Counter(d)
            first = {w: i for i, w in reversed(list(enumerate(d)))}
            scored = sorted(tf, key=lambda w: (-tf[w] * (math.log((1 + n) / (1 + df[w])) + 1), first[w]))
            out.append(scored[:KEYWORDS_TOP])
        return out


def _near_duplicate(a: set, b: set) -> bool:
    """Whether two content-word sets are near-duplicates with at most one extra word in `a`."""
    if min(len(a), len(b)) < NEAR_DUP_MIN_WORDS:
        return False
    inter = len(a & b)
    return inter / min(len(a), len(b)) >= NEAR_DUP_CONTAINMENT and len(a - b) <= MAX_OWN_WORDS_IN_SHARE
