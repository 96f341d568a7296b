"""Text helpers shared by the labelers: hashes, the author's own words, the plain-repost rule.

The plain-repost rule (EVALUATION.md §1) is the same for real and generated text and for every
labeler: drop the forward chain (another user's text), @mentions, whitespace and punctuation; if
nothing is left, or only 转发微博 / 转发 / 转 / 扩散 (English: only `RT @user: …`, or the topic itself),
the comment is labelled without a model.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# A forward chain starts at "//" (CED: "//<parent text>", rumdect: "//@name:…"), but not the "//"
# of a URL scheme ("http://").
_CHAIN = re.compile(r"(?<![:：])//")
# A retweet: "RT @user: …" (anything after it is someone else's tweet).
_RETWEET = re.compile(r"(?:^|\s)RT\s*@\S+", re.I)
_MENTION = re.compile(r"@[^\s@:：,，.。!！?？;；/()（）\[\]【】\"'“”]+")
# Crawled texts hold cut links ("http:", "http://t.cn/…"), so the scheme alone counts.
_URL = re.compile(r"(?:https?:|www\.|pic\.twitter\.com/)\S*", re.I)
# Only these words left → a plain Weibo repost.
REPOST_WORDS_ZH = ("转发微博", "转发", "转", "扩散", "轉發微博", "轉發")


def nfc(text: str) -> str:
    """Unicode NFC form (one byte sequence per visible text, so hashes agree across sources)."""
    return unicodedata.normalize("NFC", text)


def text_hash(text: str) -> str:
    """sha256 hex of the NFC text: stored with every label row and checked on every join."""
    return hashlib.sha256(nfc(text).encode("utf-8")).hexdigest()


def own_text(text: str, language: str) -> str:
    """The author's own words: the text before the forward chain (zh) or before `RT @user` (en)."""
    text = nfc(text)
    if language == "zh":
        return _CHAIN.split(text, maxsplit=1)[0]
    m = _RETWEET.search(text)
    return text[: m.start()] if m else text


def strip_noise(text: str) -> str:
    """Text without @mentions, whitespace and punctuation (Unicode category P*)."""
    text = _MENTION.sub("", text)
    return "".join(c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))


def remove_urls(text: str) -> str:
    """Text with URLs removed."""
    return _URL.sub(" ", text)


def _bare(text: str) -> str:
    return strip_noise(remove_urls(text)).lower()


def is_plain_repost(text: str, language: str, topic: str = "") -> bool:
    """Whether `text` is a plain repost by the rule of EVALUATION.md §1."""
    left = strip_noise(own_text(text, language))
    if language == "zh":
        return left == "" or left in REPOST_WORDS_ZH
    if _bare(own_text(text, language)) == "":
        return True
    # English: a copy of the topic itself (URLs, mentions and punctuation aside).
    return bool(topic) and _bare(text) == _bare(topic)
