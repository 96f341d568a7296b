"""Regenerate the shipped event fixture `mfjax/assets/events/*.jsonl` from the shared corpora.

    python -m mfjax.assets.make_fixture --data=../shared/data

reads (`--data` defaults to `<repository>/../shared/data`):
- `<data>/ced/`: the first rumour and the first non-rumour event by name, cut to their first
  `CED_AGENTS` reactions in time order;
- `<data>/weibo/test/<RUMDECT_EVENT>.json`: cut to its first `RUMDECT_AGENTS` responders in time
  order (with the source post, the file's first 40 records);
- `<data>/twitter/events/<TWITTER_EVENTS>.json`: each cut to its first `TWITTER_AGENTS` tweets (the
  English demo: rumours with varied reactions, not only copies of a headline).

Personal data is stripped: user ids become per-event pseudonyms ("u1", "u2", ... by first
appearance; unknown ids stay ""), @mentions inside texts (rumdect repost chains carry screen
names) become "@用户" / "@user", and contact details (e-mails, digit runs of 7+) become
"<contact>". Screen names, user names and avatars never enter the event schema at all.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mfjax.data import jsonl, twitter, weibo
from mfjax.data.privacy import mask_personal
from mfjax.data.events import Event, select_agents

CED_AGENTS = 64
RUMDECT_EVENT = "3476055656644087"
RUMDECT_AGENTS = 39
TWITTER_EVENTS = ("PlaxicoBurress", "SarahJessicaSurrogate")
TWITTER_AGENTS = 64

_OUT_DIR = Path(__file__).resolve().parent / "events"
_REPO = Path(__file__).resolve().parents[2]
def anonymize(event: Event, num_agents: int) -> Event:
    """The event cut to its first `num_agents` agents, with pseudonymous uids and masked texts."""
    pseudonyms: dict = {}
    agents = []
    for agent in select_agents(event, num_agents, strict=True):
        # An empty uid means "unknown user" (Twitter): it must not become one shared pseudonym.
        uid = agent.uid and pseudonyms.setdefault(agent.uid, f"u{len(pseudonyms) + 1}")
        agents.append(dataclasses.replace(
            agent, uid=uid, action=mask_personal(agent.action, event.language),
            user_description=(None if agent.user_description is None
                              else mask_personal(agent.user_description, event.language))))
    return dataclasses.replace(event, topic=mask_personal(event.topic, event.language),
                               agents=tuple(agents), source_path=None)


def main(argv=None) -> None:
    """Write the three fixture files and print their sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(_REPO.parent / "shared" / "data"),
                        help="root holding ced/, weibo/ and twitter/")
    args = parser.parse_args(argv)
    data = Path(args.data)
    _OUT_DIR.mkdir(parents=True, exist_ok=True)

    names = weibo.ced_event_names(data / "ced")
    picks = [next(n for n, lab in names if lab == label) for label in ("rumor", "non-rumor")]
    ced = [anonymize(weibo.read_ced_event(data / "ced", n), CED_AGENTS) for n in picks]
    jsonl.write_jsonl(ced, _OUT_DIR / "ced_sample.jsonl")

    event = weibo.read_rumdect_event(data / "weibo" / "test" / f"{RUMDECT_EVENT}.json")
    jsonl.write_jsonl([anonymize(event, RUMDECT_AGENTS)], _OUT_DIR / "rumdect_sample.jsonl")

    tweets = [twitter.read_twitter_event(data / "twitter" / "events" / f"{name}.json")[0] for name in TWITTER_EVENTS]
    jsonl.write_jsonl([anonymize(e, TWITTER_AGENTS) for e in tweets], _OUT_DIR / "twitter_sample.jsonl")

    for path in sorted(_OUT_DIR.glob("*.jsonl")):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
