"""API judge: an OpenAI-compatible chat-completions model labels comments (EVALUATION.md §4).

- One request = up to `batch_size` comments (5, as the paper) of one population, sorted by id, sent as
  `[{"id", "text"}]` with the topic; the answer must follow a strict JSON schema with an enum per
  dimension. Answers are matched **by id**: a missing, duplicate or unknown id is never padded; missing
  ids are asked again in a smaller batch, then one by one. An out-of-enum value becomes null (counted).
  Malformed JSON content gets one repair retry of the batch, then single-comment requests.
- temperature 0 and a fixed `seed`, recorded; plain reposts (§1 rule) are labelled locally, not sent.
- Bounded concurrency (a thread pool of `concurrency` workers); retries with backoff and Retry-After
  live in `mfjax.eval.http`.
- Budget: each request reserves its worst case (prompt estimate + max completion tokens) before it is
  sent; a request that could cross the cap is not sent, the job stops cleanly, keeps its cache, and
  the missing comments are simply absent from the result (the evaluator withholds, never subsets).
- Cache: one JSONL line per labelled comment, appended and flushed after every batch, keyed by
  hash(base URL, model, prompt hash, schema hash, topic hash, text hash); a rerun sends nothing for
  cached comments. The API key is read from the environment variable named in the config at request
  time and is never stored, logged or written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Optional

from mfjax.eval import http, schema
from mfjax.eval.labelers.base import Population
from mfjax.eval.text import is_plain_repost, text_hash

logger = logging.getLogger(__name__)

PROMPT_VERSION = 1
SYSTEM_PROMPT = {
    "en": ("You are an expert annotator of social-media reactions to a post (the topic). For each comment, "
           "judge only the author's own words (ignore forwarded text after '//' or 'RT @user:') and label:\n"
           + "\n".join(f"- {d}: {schema.DEFINITIONS[d]}"
                       + (f" (one of: {', '.join(schema.VALUES[d])})" if d in schema.VALUES else "")
                       for d in schema.DIMENSIONS)
           + "\nStance and rumor are about the topic's claim. Answer with JSON {\"items\": [...]}, one object per "
             "comment, each with the comment's id and every field."),
    "zh": ("你是社交媒体评论的专业标注员。话题是一条微博，评论是网友对它的回应。只判断作者自己写的内容"
           "（忽略“//”之后或“RT @用户:”之后转发的他人文字），为每条评论标注：\n"
           + "\n".join(f"- {d}: {schema.DEFINITIONS[d]}"
                       + (f"（取值之一：{', '.join(schema.VALUES[d])}）" if d in schema.VALUES else "")
                       for d in schema.DIMENSIONS)
           + "\n立场(stance)和谣言(rumor)针对话题中的说法。用 JSON {\"items\": [...]} 回答，每条评论一个对象，"
             "包含该评论的 id 和全部字段，取值用上面的英文词。"),
}


def prompt_hash(language: str) -> str:
    """Short hash of the prompt text of a language (part of the judge's version and cache key)."""
    return hashlib.sha256(f"{PROMPT_VERSION}\n{SYSTEM_PROMPT[language]}".encode("utf-8")).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Everything about the endpoint and the limits (no secret: only the key's variable NAME)."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = 5
    concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 6
    seed: int = 0
    budget_usd: Optional[float] = None
    price_in_per_m: Optional[float] = None
    price_out_per_m: Optional[float] = None
    max_total_tokens: Optional[int] = None
    max_completion_tokens_per_item: int = 120
    response_format: str = "json_schema"  # or "json_object"
    cache_dir: Optional[str] = None


class BudgetExceeded(RuntimeError):
    """The next request could cross the budget; nothing more is sent."""


class Budget:
    """Spending so far plus reservations of requests in flight; thread-safe."""

    def __init__(self, max_usd: Optional[float] = None, price_in: Optional[float] = None,
                 price_out: Optional[float] = None, max_tokens: Optional[int] = None):
        self.max_usd, self.price_in, self.price_out, self.max_tokens = max_usd, price_in, price_out, max_tokens
        self.spent_usd = 0.0
        self.used_tokens = 0
        self._reserved_usd = 0.0
        self._reserved_tokens = 0
        self.exhausted = False
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: JudgeConfig) -> "Budget":
        return cls(config.budget_usd, config.price_in_per_m, config.price_out_per_m, config.max_total_tokens)

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.price_in is None or self.price_out is None:
            return 0.0
        return (prompt_tokens * self.price_in + completion_tokens * self.price_out) / 1e6

    def reserve(self, prompt_tokens: int, completion_tokens: int) -> tuple:
        """Reserve a request's worst case, or raise BudgetExceeded (and mark the budget exhausted)."""
        cost, tokens = self._cost(prompt_tokens, completion_tokens), prompt_tokens + completion_tokens
        with self._lock:
            if self.exhausted:
                raise BudgetExceeded("budget exhausted")
            over_usd = self.max_usd is not None and self.spent_usd + self._reserved_usd + cost > self.max_usd
            over_tok = self.max_tokens is not None and self.used_tokens + self._reserved_tokens + tokens > self.max_tokens
            if over_usd or over_tok:
                self.exhausted = True
                raise BudgetExceeded(f"the next request could cross the budget (spent ${self.spent_usd:.4f}, "
                                     f"{self.used_tokens} tokens)")
            self._reserved_usd += cost
            self._reserved_tokens += tokens
        return cost, tokens

    def settle(self, reservation: tuple, usage: Optional[dict]) -> None:
        """Replace a reservation by the request's actual usage (or keep the worst case without usage)."""
        cost, tokens = reservation
        with self._lock:
            self._reserved_usd -= cost
            self._reserved_tokens -= tokens
            if usage:
                p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
                self.spent_usd += self._cost(p, c)
                self.used_tokens += p + c
            else:
                self.spent_usd += cost
                self.used_tokens += tokens


class JudgeCache:
    """Append-only JSONL of judged comments, flushed after every batch."""

    def __init__(self, directory: Optional[str]):
        self.path = Path(directory) / "judge_cache.jsonl" if directory else None
        self._rows: dict = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        logger.warning("%s: line %d is not JSON (an interrupted write?); ignored", self.path, n)
                        continue
                    self._rows[row["key"]] = row

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            return self._rows.get(key)

    def add(self, rows: list) -> None:
        with self._lock:
            for row in rows:
                self._rows[row["key"]] = row
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())


def _estimate_tokens(text: str) -> int:
    # An over-estimate for BPE vocabularies: ~4 bytes per English token, ~1 token per CJK character
    # (3 bytes); half the UTF-8 length bounds both, plus per-message overhead.
    return math.ceil(len(text.encode("utf-8")) / 2) + 16


class Judge:
    """The API judge for one language (name "judge")."""

    name = "judge"

    def __init__(self, config: JudgeConfig, language: str, *, budget: Optional[Budget] = None,
                 client: Optional[http.JsonClient] = None, cache: Optional[JudgeCache] = None):
        if language not in SYSTEM_PROMPT:
            raise ValueError(f"no judge prompt for language {language!r}")
        self.config = config
        self.language = language
        self.budget = budget or Budget.from_config(config)
        self.client = client or http.JsonClient(http.RetryPolicy(max_attempts=config.max_attempts), seed=config.seed)
        self.cache = cache or JudgeCache(config.cache_dir)
        self.stats = {"requests": 0, "out_of_enum": 0, "reasked": 0, "malformed": 0, "failed": 0}
        self._stats_lock = threading.Lock()

    @property
    def version(self) -> str:
        """judge/<model>/p<prompt hash>/s<schema hash>."""
        return f"judge/{self.config.model}/p{prompt_hash(self.language)}/s{schema.schema_hash()}"

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def cache_key(self, topic: str, text: str) -> str:
        parts = [self.config.base_url.rstrip("/"), self.config.model, prompt_hash(self.language),
                 schema.schema_hash(), text_hash(topic), text_hash(text)]
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def request_payload(self, topic: str, items: list) -> dict:
        """The chat-completions request body for one batch."""
        user = json.dumps({"topic": topic, "items": items}, ensure_ascii=False)
        payload = {"model": self.config.model, "temperature": 0, "seed": self.config.seed,
                   "max_tokens": self.config.max_completion_tokens_per_item * len(items) + 50,
                   "messages": [{"role": "system", "content": SYSTEM_PROMPT[self.language]},
                                {"role": "user", "content": user}]}
        if self.config.response_format == "json_schema":
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "comment_labels", "strict": True, "schema": schema.judge_schema()}}
        else:
            payload["response_format"] = {"type": "json_object"}
        return payload

    def label(self, population: Population) -> dict:
        """Labels keyed by id; comments not labelled (budget stop, failures) are absent."""
        out: dict = {}
        todo = []
        same_text: dict = {}  # cache key -> comments sharing it (one is sent; all get its labels)
        for c in sorted(population.comments, key=lambda c: c.id):
            if is_plain_repost(c.text, population.language, population.topic):
                out[c.id] = dict(schema.PLAIN_REPOST_LABELS, keywords=[])
                continue
            key = self.cache_key(population.topic, c.text)
            hit = self.cache.get(key)
            if hit is not None:
                out[c.id] = hit["labels"]
            elif key in same_text:
                same_text[key].append(c)  # an exact duplicate (headline copies are common): not sent twice
            else:
                same_text[key] = [c]
                todo.append(c)
        batches = [todo[i:i + self.config.batch_size] for i in range(0, len(todo), self.config.batch_size)]
        lock = threading.Lock()
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = [pool.submit(self._judge_batch, population.topic, batch) for batch in batches]
            for future in concurrent.futures.as_completed(futures):
                got = future.result()
                with lock:
                    out.update(got)
        for comments in same_text.values():
            sent = comments[0]
            if sent.id in out:
                for c in comments[1:]:
                    out[c.id] = out[sent.id]
        return out

    def _judge_batch(self, topic: str, batch: list, stage: int = 0) -> dict:
        """Labels of a batch; {} past the budget.

        Stage 0: the batch as drawn (a malformed answer gets one repair retry); ids still missing are
        asked again together (stage 1), and what is still missing then, one by one (stage 2).
        """
        if self.budget.exhausted:
            return {}
        try:
            got, malformed = self._ask(topic, batch)
            if malformed:
                self._count("malformed")
                if stage == 0:
                    got, malformed = self._ask(topic, batch)  # the repair retry
                    if malformed:
                        self._count("malformed")
        except http.HttpError as e:
            logger.warning("judge request failed for %d comment(s): %s", len(batch), e)
            self._count("failed", len(batch))
            return {}
        except BudgetExceeded:
            return {}
        missing = [c for c in batch if c.id not in got]
        if not missing:
            return got
        if len(batch) == 1:
            self._count("failed")
            return got
        self._count("reasked", len(missing))
        if stage == 0 and len(missing) > 1:
            got.update(self._judge_batch(topic, missing, stage=1))
        else:
            for c in missing:
                got.update(self._judge_batch(topic, [c], stage=2))
        return got

    def _ask(self, topic: str, batch: list) -> tuple[dict, bool]:
        """One request: ({id: labels} for valid answers with known ids, whether the content was malformed)."""
        items = [{"id": c.id, "text": c.text} for c in batch]
        payload = self.request_payload(topic, items)
        reservation = self.budget.reserve(_estimate_tokens(json.dumps(payload["messages"], ensure_ascii=False)),
                                          payload["max_tokens"])
        usage = None
        try:
            headers = {"Authorization": f"Bearer {os.environ.get(self.config.api_key_env, '')}"}
            self._count("requests")
            answer = self.client.post(f"{self.config.base_url.rstrip('/')}/chat/completions", payload, headers,
                                      self.config.timeout_s)
            usage = answer.get("usage") if isinstance(answer, dict) else None
        finally:
            self.budget.settle(reservation, usage)
        try:
            content = answer["choices"][0]["message"]["content"]
            parsed = json.loads(content)
            answered = parsed["items"]
            if not isinstance(answered, list):
                raise TypeError("items is not a list")
        except (KeyError, IndexError, TypeError, json.JSONDecodeError):
            return {}, True
        by_id = {c.id: c for c in batch}
        seen: dict = {}
        duplicates = set()
        for item in answered:
            if not isinstance(item, dict) or item.get("id") not in by_id:
                continue  # unknown id: ignored, never matched by position
            if item["id"] in seen:
                duplicates.add(item["id"])
            seen[item["id"]] = item
        got, rows = {}, []
        for cid, item in seen.items():
            if cid in duplicates:
                continue  # two answers for one id: which is right is unknown, so ask again
            labels, problems = schema.clean_labels(item)
            if any("not in" in p for p in problems):
                self._count("out_of_enum", sum(1 for p in problems if "not in" in p))
            got[cid] = labels
            comment = by_id[cid]
            rows.append({"key": self.cache_key(topic, comment.text), "id": cid, "labels": labels,
                         "model": self.config.model, "system_fingerprint": answer.get("system_fingerprint"),
                         "seed": self.config.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "problems": problems})
        if rows:
            self.cache.add(rows)
        return got, False
