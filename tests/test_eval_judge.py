"""The API judge against a real local HTTP server that answers like an OpenAI-compatible endpoint.

The server (http.server.ThreadingHTTPServer on 127.0.0.1, port 0, in a thread) is scripted per batch:
429 + Retry-After, 500, a reply slower than the client's timeout, malformed JSON content, shuffled
items, a missing and an unknown id, an out-of-enum value. Each comment's text says which labels it
should get, so any misalignment (a label on the wrong id) shows up as a wrong value.
"""

import email.utils
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mfjax.eval import http, schema
from mfjax.eval.labelers import judge as J
from mfjax.eval.labelers.base import Comment, Population

KEY_ENV = "MFJAX_TEST_JUDGE_KEY"
SECRET = "sk-test-DO-NOT-STORE-4242"
INTENTS = ("question", "promotion", "opinion")
STANCES = ("oppose", "neutral", "support")


def expected_labels(text: str) -> dict:
    """What the fake model answers for a text "comment N": a function of N (so mix-ups are visible)."""
    n = int(text.split()[1])
    return {"rumor": "spread", "sentiment_state": "calm", "sentiment_tendency": "neutral",
            "behavior_type": "comment", "stance": STANCES[n % 3], "belief_degree": "believe",
            "subjectivity": "subjective", "intent": INTENTS[n % 3], "keywords": [f"k{n}"]}


class FakeClock(http.Clock):
    def __init__(self):
        self.sleeps = []
        self._lock = threading.Lock()

    def sleep(self, seconds):
        with self._lock:
            self.sleeps.append(seconds)


class Server:
    """Scripted fake chat-completions endpoint; `script[first id]` lists behaviours per attempt."""

    def __init__(self, script=None, delay=0.05, answer=None):
        self.script = script or {}
        self.answer = answer or expected_labels
        self.delay = delay
        self.requests = []
        self.attempts = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                abandoned = server.respond(self, body)
                if not abandoned:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, handler, body):
        items = json.loads(body["messages"][1]["content"])["items"]
        ids = [it["id"] for it in items]
        key = ids[0] if len(ids) > 1 else "single:" + ids[0]
        with self.lock:
            attempt = self.attempts.get(key, 0)
            self.attempts[key] = attempt + 1
        plan = self.script.get(key, [])
        action = plan[attempt] if attempt < len(plan) else "ok"
        time.sleep(self.delay)
        if action == "429":
            self._send(handler, 429, {"error": "rate limited"}, {"Retry-After": "7"})
            return False
        if action == "429date":
            when = email.utils.formatdate(time.time() + 30, usegmt=True)
            self._send(handler, 429, {"error": "rate limited"}, {"Retry-After": when})
            return False
        if action == "500":
            self._send(handler, 500, {"error": "boom"})
            return False
        if action == "400":
            self._send(handler, 400, {"error": "bad request"})
            return False
        if action == "slow":
            # The client gives up at its timeout: from then on this request is no longer in flight.
            with self.lock:
                self.in_flight -= 1
            time.sleep(1.5)
            self._send(handler, 200, {"choices": []})
            return True
        answers = [dict(self.answer(it["text"]), id=it["id"]) for it in items]
        answers.reverse()  # shuffled: never in request order
        content = json.dumps({"items": answers})
        if action == "malformed":
            content = '{"items": [{"id": '
        elif action == "missing_unknown_enum":
            answers = answers[1:]  # drop one id
            answers.append(dict(answers[0], id="no-such-id"))
            answers[0] = dict(answers[0], intent="rant")  # out of enum
            content = json.dumps({"items": answers})
        elif action == "duplicate":
            content = json.dumps({"items": answers + [dict(answers[0], stance="support")]})
        usage = {"prompt_tokens": 100, "completion_tokens": 20 * len(items), "total_tokens": 100 + 20 * len(items)}
        self._send(handler, 200, {"id": "x", "object": "chat.completion", "system_fingerprint": "fp_test",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                               "finish_reason": "stop"}], "usage": usage})
        return False

    @staticmethod
    def _send(handler, status, obj, headers=None):
        data = json.dumps(obj).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)

    def sent_ids(self):
        return [it["id"] for r in self.requests for it in json.loads(r["body"]["messages"][1]["content"])["items"]]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def population(n=25, language="en", extra=()):
    comments = [Comment(f"c{i:02d}", f"comment {i} about it", language) for i in range(n)]
    comments += list(extra)
    return Population(key="t/e1", topic="the topic claim", language=language, comments=comments)


def make_judge(server, tmp_path, clock, **kw):
    config = J.JudgeConfig(base_url=server.url, model="fake-model-2024-01-01", api_key_env=KEY_ENV,
                           concurrency=kw.pop("concurrency", 2), timeout_s=kw.pop("timeout_s", 0.5),
                           max_attempts=4, seed=1234, cache_dir=str(tmp_path / "judge_cache"), **kw)
    client = http.JsonClient(http.RetryPolicy(max_attempts=4), clock=clock, seed=0)
    return J.Judge(config, "en", client=client)


def check_aligned(labels, pop):
    for c in pop.comments:
        if c.id not in labels:
            continue
        want = expected_labels(c.text) if c.text.startswith("comment") else None
        if want:
            got = labels[c.id]
            assert got["stance"] == want["stance"], c.id
            assert got["keywords"] == want["keywords"], c.id
            assert got["intent"] in (want["intent"], None), c.id


def test_judge_survives_scripted_failures_without_misalignment_or_loss(tmp_path, key_env):
    # Batches (sorted ids, 5 per request): c00-c04, c05-c09, c10-c14, c15-c19, c20-c24.
    script = {"c00": ["429"], "c05": ["500", "500"], "c10": ["slow"], "c15": ["malformed"],
              "c20": ["missing_unknown_enum"]}
    server = Server(script)
    clock = FakeClock()
    repost = Comment("r1", "RT @someone: the topic claim", "en")
    pop = population(extra=[repost])
    try:
        judge = make_judge(server, tmp_path, clock)
        labels = judge.label(pop)
    finally:
        server.close()
    # Nothing lost: every comment is labelled, on its own id.
    assert set(labels) == {c.id for c in pop.comments}
    check_aligned(labels, pop)
    # The out-of-enum intent became null (counted), never a default.
    nulls = [cid for cid, lab in labels.items() if lab["intent"] is None]
    assert len(nulls) == 1 and judge.stats["out_of_enum"] == 1
    # The plain repost was labelled locally and never sent.
    assert labels["r1"] == dict(schema.PLAIN_REPOST_LABELS, keywords=[])
    assert "r1" not in server.sent_ids()
    # The missing id was asked again; the unknown id was ignored.
    assert judge.stats["reasked"] == 1 and "no-such-id" not in labels
    # Retry-After honoured on the fake clock (no real sleeping), backoff for the 500s.
    assert 7.0 in clock.sleeps
    assert len(clock.sleeps) == 1 + 2 + 1  # 429, two 500s, one timeout
    # Every request carries temperature 0, the seed, the strict schema and the key (in a header only).
    for r in server.requests:
        body = r["body"]
        assert body["temperature"] == 0 and body["seed"] == 1234
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["strict"] is True
        assert body["response_format"]["json_schema"]["schema"] == schema.judge_schema()
        assert r["auth"] == f"Bearer {SECRET}"
        assert r["path"] == "/v1/chat/completions"
    # Concurrency bound held.
    assert 1 <= server.max_in_flight <= 2


def test_rerun_hits_the_cache_and_sends_nothing(tmp_path, key_env):
    server = Server()
    pop = population(12)
    try:
        first = make_judge(server, tmp_path, FakeClock()).label(pop)
        sent = len(server.requests)
        assert sent == 3
        second = make_judge(server, tmp_path, FakeClock()).label(pop)
    finally:
        server.close()
    assert len(server.requests) == sent
    assert second == first
    # A changed text is a different cache key: it would be sent again.
    judge = make_judge(server, tmp_path, FakeClock())
    assert judge.cache_key(pop.topic, "comment 1 about it") != judge.cache_key(pop.topic, "comment 1 about it!")


def test_budget_stop_keeps_the_cache_and_resumes(tmp_path, key_env):
    server = Server()
    pop = population(25)
    try:
        probe = make_judge(server, tmp_path, FakeClock())
        payload = probe.request_payload(pop.topic, [{"id": c.id, "text": c.text} for c in pop.comments[:5]])
        worst_case = J._estimate_tokens(json.dumps(payload["messages"], ensure_ascii=False)) + payload["max_tokens"]
        # Room for the first request's worst case plus 300 tokens: each answer uses 200 (the fake usage), so a
        # second request still fits (200 + worst case <= cap) and a third could cross the cap: it is not sent.
        judge = make_judge(server, tmp_path, FakeClock(), concurrency=1, max_total_tokens=worst_case + 300)
        labels = judge.label(pop)
        assert judge.budget.exhausted
        assert len(server.requests) == 2 and len(labels) == 10
        assert judge.budget.used_tokens == 400 <= worst_case + 300
        check_aligned(labels, pop)
        sent_before = len(server.requests)
        # A rerun with room left sends only what is missing.
        resumed = make_judge(server, tmp_path, FakeClock(), concurrency=1).label(pop)
    finally:
        server.close()
    assert set(resumed) == {c.id for c in pop.comments}
    resent = [it["id"] for r in server.requests[sent_before:]
              for it in json.loads(r["body"]["messages"][1]["content"])["items"]]
    assert sorted(resent) == sorted(set(resumed) - set(labels))
    check_aligned(resumed, pop)


def test_identical_texts_are_sent_once(tmp_path, key_env):
    server = Server()
    comments = [Comment(f"c{i}", "comment 4 headline", "en") for i in range(3)] + [Comment("d", "comment 5 x", "en")]
    pop = Population("t/e", "topic", "en", comments)
    try:
        labels = make_judge(server, tmp_path, FakeClock()).label(pop)
    finally:
        server.close()
    assert sorted(server.sent_ids()) == ["c0", "d"]
    assert labels["c1"] == labels["c2"] == labels["c0"] == dict(expected_labels("comment 4 headline"))
    assert set(labels) == {"c0", "c1", "c2", "d"}


def test_duplicate_ids_are_asked_again_and_non_retryable_status_fails_fast(tmp_path, key_env):
    server = Server({"c00": ["duplicate"], "c05": ["400"]})
    clock = FakeClock()
    pop = population(10)
    try:
        judge = make_judge(server, tmp_path, clock)
        labels = judge.label(pop)
    finally:
        server.close()
    # The duplicated id was re-asked and got its own answer.
    check_aligned(labels, pop)
    assert all(f"c0{i}" in labels for i in range(5))
    # HTTP 400: no retry, those comments are absent (not padded), counted as failed.
    assert not any(f"c0{i}" in labels for i in range(5, 10))
    assert judge.stats["failed"] == 5
    assert server.attempts["c05"] == 1


def test_api_key_is_in_no_file(tmp_path, key_env):
    server = Server()
    try:
        judge = make_judge(server, tmp_path, FakeClock())
        judge.label(population(7))
    finally:
        server.close()
    assert server.requests
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), name
    assert SECRET not in repr(judge.config) and SECRET not in judge.version


def test_retry_after_http_date_and_backoff():
    now = time.time()
    when = email.utils.formatdate(now + 30, usegmt=True)
    assert http.parse_retry_after(when, now) == pytest.approx(30, abs=1.5)
    assert http.parse_retry_after("12", now) == 12.0
    assert http.parse_retry_after("soon", now) is None
    import random

    policy = http.RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)
    rng = random.Random(0)
    for attempt in range(1, 8):
        assert 0 <= http.backoff_delay(attempt, policy, rng) <= min(8.0, 2 ** (attempt - 1))


def test_version_names_model_prompt_and_schema():
    config = J.JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m-2024")
    j = J.Judge(config, "zh")
    assert j.version.startswith("judge/m-2024/p") and f"/s{schema.schema_hash()}" in j.version
    assert J.prompt_hash("zh") != J.prompt_hash("en")


def hashed_labels(text: str) -> dict:
    """A fake model's answer for any text: each value picked by a hash of the text."""
    import hashlib

    h = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)
    out = {}
    for i, (dim, values) in enumerate(schema.VALUES.items()):
        out[dim] = values[(h >> (3 * i)) % len(values)]
    return dict(out, keywords=[text[:2]])


def test_evaluation_with_the_api_judge_end_to_end(tmp_path, key_env):
    from eval_fixtures import make_events, make_run

    from mfjax.eval import evaluation, pipeline

    events_path = tmp_path / "events.jsonl"
    events = make_events(events_path, n_events=2)
    make_run(tmp_path / "mf", events_path, events, "mf")
    make_run(tmp_path / "state", events_path, events, "state")
    server = Server(answer=hashed_labels, delay=0.0)

    def factory(max_tokens=None):
        def make(language):
            config = J.JudgeConfig(base_url=server.url, model="fake-model-2024-01-01", api_key_env=KEY_ENV,
                                   concurrency=4, timeout_s=5, seed=7, max_total_tokens=max_tokens,
                                   cache_dir=str(tmp_path / "judge_cache"))
            return J.Judge(config, language, client=http.JsonClient(clock=FakeClock()))
        return make

    def options(out, **kw):
        return evaluation.Options(runs=[f"mf={tmp_path / 'mf'}", f"state={tmp_path / 'state'}"], out_dir=str(out),
                                  labeler="api", judge_model="fake-model-2024-01-01", progress=False,
                                  settings=pipeline.Settings(n_bootstrap=100), **kw)

    try:
        # A budget too small for everything: the job stops cleanly and withholds every dimension.
        partial = evaluation.run(options(tmp_path / "partial", judge_factory=factory(max_tokens=3000)))
        assert 0 < partial["coverage"]["labelled"] < partial["coverage"]["comments"]
        assert set(partial["withheld"]) == set(schema.CATEGORICAL) and not partial["reportable"]
        assert all("labels incomplete" in reason for reason in partial["withheld"].values())
        sent_partial = len(server.requests)
        # Rerun with room: resumes from the judge cache, then reports every dimension.
        full = evaluation.run(options(tmp_path / "full", judge_factory=factory()))
        # The judge is the run's own model: refused before any labelling.
        with pytest.raises(evaluation.EvaluationError, match="favours its own text"):
            evaluation.prepare(dataclasses_replace(options(tmp_path / "x", judge_factory=factory()),
                                                   judge_model="/models/fake"))
    finally:
        server.close()
    assert full["coverage"]["labelled"] == full["coverage"]["comments"]
    assert full["reportable"] == list(schema.CATEGORICAL) and not full["withheld"]
    assert full["labeler_versions"]["zh"].startswith("judge/fake-model-2024-01-01/p")
    # Nothing judged twice: the cached comments were not sent again (plain reposts are never sent).
    sent_ids = server.sent_ids()
    assert len(sent_ids) == len(set(sent_ids)) and len(server.requests) > sent_partial
    est = full["results"]["estimates"]["mf"]
    assert est["stance"]["kl"]["mean"] >= 0 and "wasserstein1" in est["stance"]


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)
