"""Labelers: one protocol (`base.Labeler`), the offline rule stacks per language, and the API judge."""

from __future__ import annotations

KINDS = ("rules", "api")


def rules_for(language: str):
    """The rule labeler of a language."""
    if language == "zh":
        from mfjax.eval.labelers.rules_zh import ZhRules

        return ZhRules()
    if language == "en":
        from mfjax.eval.labelers.rules_en import EnRules

        return EnRules()
    raise ValueError(f"no rule labeler for language {language!r}")
