"""Masking of personal details in real texts: @mentions and contact details name real people.

Used wherever real posts leave the corpora: the shipped event fixture, the labeler-validation samples
and the populations the labelers are validated on.
"""

from __future__ import annotations

import re

# A mention runs until whitespace, punctuation or the next mention.
_MENTION = re.compile(r"@[^\s@:：,，.。!！?？;；/()（）\[\]【】\"'“”]+")
_MENTION_WORD = {"zh": "@用户", "en": "@user"}
# Profiles sometimes carry contact details: long digit runs (phone / QQ numbers) and e-mails.
# (A digit run inside a URL or an ASCII word is left alone.)
_CONTACT = re.compile(r"[A-Za-z0-9_.+-]+@[A-Za-z0-9-]+\.[A-Za-z0-9.]+"
                      r"|(?<![A-Za-z0-9_/.-])\d{7,}")
_CONTACT_WORD = "<contact>"


def mask_personal(text: str, language: str) -> str:
    """Replace contact details and every @mention by neutral words (``language`` picks "@用户" or "@user")."""
    return _MENTION.sub(_MENTION_WORD[language], _CONTACT.sub(_CONTACT_WORD, text))
