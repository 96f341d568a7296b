"""Convert the English Twitter rumour events into the generic JSONL event format.

    python launch/convert_twitter.py --twitter_dir=../shared/data/twitter/events --out=twitter.jsonl

Deleted tweets ([null, null]) are
dropped and counted in the report printed at the end.
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a script from a source checkout: make the package importable without installing it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from mfjax.data import jsonl, twitter  # noqa: E402

_TWITTER_DIR = flags.DEFINE_string("twitter_dir", None, "Folder of <name>.json Twitter events.")
_OUT = flags.DEFINE_string("out", None, "Output JSONL path.")
flags.mark_flags_as_required(["twitter_dir", "out"])


def main(argv):
    del argv
    events, stats = twitter.convert_twitter_dir(_TWITTER_DIR.value)
    n = jsonl.write_jsonl(events, _OUT.value)
    agents = sum(e.num_agents for e in events)
    logging.info("wrote %d events (%d agents) to %s; %d of %d tweets were deleted and dropped",
                 n, agents, _OUT.value, stats.deleted, stats.tweets)
    print(f"events={n} agents={agents} tweets={stats.tweets} deleted={stats.deleted} "
          f"out={_OUT.value}")


if __name__ == "__main__":
    app.run(main)
