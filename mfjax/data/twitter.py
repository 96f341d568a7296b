"""Convert the English Twitter rumour events (Ma et al. 2016) into `Event`s / the JSONL format.

Each source file maps tweet id -> [time text, tweet text]; [null, null] marks a tweet deleted
before the crawl. Tweets are ordered by id (posting order); the earliest surviving tweet is the
topic and the others are the agents. There are no profiles (all profile fields None), no user ids
(uid "") and no labels.

Times: tweet ids since November 2010 are snowflake ids that encode the posting time to the
millisecond, so those times come from the id. Older ids carry only the page's minute-resolution
time text ("11:18 AM - 20 Oct 2015"), which is US Pacific time (checked against the snowflake
times of the shared sample: offsets of -7 h / -8 h, i.e. PDT / PST) and is read as such.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path
from typing import Optional
import zoneinfo

from mfjax.data.events import Agent, Event, EventDataError, sort_agents
from mfjax.data.weibo import list_json_files, load_json

logger = logging.getLogger(__name__)

_SNOWFLAKE_EPOCH_MS = 1288834974657
# Pre-snowflake ids stayed below ~3e10; snowflake ids start near 3e16. Anything in between is
# unused, so this bound separates the two cleanly.
_SNOWFLAKE_MIN_ID = 1 << 40
_TIME_FORMAT = "%I:%M %p - %d %b %Y"


@dataclasses.dataclass(frozen=True)
class TwitterStats:
    """What a conversion kept and dropped, for the report."""

    tweets: int  # ids in the source files
    deleted: int  # [null, null] entries, dropped
    events: int = 1

    def __add__(self, other: "TwitterStats") -> "TwitterStats":
        return TwitterStats(self.tweets + other.tweets, self.deleted + other.deleted,
                            self.events + other.events)


def tweet_time(tweet_id: int, time_text: Optional[str]) -> float:
    """Unix seconds of a tweet: from its snowflake id when it has one, else from its time text."""
    if tweet_id >= _SNOWFLAKE_MIN_ID:
        return ((tweet_id >> 22) + _SNOWFLAKE_EPOCH_MS) / 1000.0
    if not time_text:
        raise ValueError(f"tweet {tweet_id}: pre-snowflake id without a time text")
    # Some time texts go on with "\n\n from <place>": keep the time only (the place is personal).
    first_line = time_text.strip().split("\n", 1)[0].strip()
    parsed = datetime.datetime.strptime(first_line, _TIME_FORMAT)
    return parsed.replace(tzinfo=zoneinfo.ZoneInfo("America/Los_Angeles")).timestamp()


def read_twitter_event(path) -> tuple:
    """(Event, TwitterStats) of one `events/<name>.json` file; deleted tweets are counted."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        raise EventDataError(f"expected an object of tweet id -> [time, text], got "
                             f"{type(data).__name__}", path=path)
    tweets = []
    deleted = 0
    for key, value in data.items():
        try:
            tweet_id = int(key)
        except ValueError:
            raise EventDataError(f"tweet id {key!r} is not an integer", path=path) from None
        if not isinstance(value, list) or len(value) != 2:
            raise EventDataError("expected [time, text]", path=path, index=tweet_id, unit="tweet")
        time_text, text = value
        if time_text is None and text is None:
            deleted += 1
            continue
        if not isinstance(text, str):
            raise EventDataError("tweet has no text", path=path, index=tweet_id, unit="tweet")
        if time_text is not None and not isinstance(time_text, str):
            raise EventDataError(f"bad time {time_text!r}", path=path, index=tweet_id,
                                 unit="tweet")
        try:
            time = tweet_time(tweet_id, time_text)
        except ValueError as e:
            raise EventDataError(str(e), path=path, index=tweet_id, unit="tweet") from e
        tweets.append((tweet_id, time, text))
    if not tweets:
        raise EventDataError("no tweet with text", path=path)
    if deleted:
        logger.info("%s: dropped %d deleted tweet(s) of %d", path, deleted, len(data))
    tweets.sort()
    _, topic_time, topic = tweets[0]
    agents = sort_agents(Agent(uid="", time=t, action=text) for _, t, text in tweets[1:])
    event = Event(event_id=path.stem, topic=topic, agents=agents, language="en",
                  source_path=str(path), topic_time=topic_time)
    return event, TwitterStats(tweets=len(data), deleted=deleted)


def convert_twitter_dir(directory) -> tuple:
    """(events in file-name order, total TwitterStats) for every `*.json` file of `directory`."""
    events = []
    total = TwitterStats(0, 0, 0)
    for path in list_json_files(directory):
        event, stats = read_twitter_event(path)
        events.append(event)
        total = total + stats
    if total.deleted:
        logger.warning("%s: dropped %d deleted tweet(s) of %d in %d event(s)", directory,
                       total.deleted, total.tweets, total.events)
    return events, total
