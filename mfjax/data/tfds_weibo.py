"""A tensorflow_datasets builder for a local rumdect Weibo folder (`<root>/train`, `<root>/test`).

Works without TensorFlow: build with `file_format="array_record"` and read with
`builder.as_data_source()` (random access, grain-friendly); `tfds.load` / `as_dataset` need TF.

    from mfjax.data import tfds_weibo
    builder = tfds_weibo.make_builder("/path/to/rumdect/Weibo", data_dir="/tmp/tfds")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source()["test"]
    event = tfds_weibo.event_from_example(source[0])

The rumdect root comes from the builder config (`RumdectConfig.source_dir`, as `make_builder`
sets it) or, for the built-in "manual" config, from tfds' manual dir
(`download_config=tfds.download.DownloadConfig(manual_dir=...)`).

This is the only module of mfjax that imports tensorflow_datasets at import time, and nothing
imports it by default: the accelerator machines do not have tfds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from mfjax.data.events import Agent, Event
from mfjax.data.weibo import list_json_files, read_rumdect_event

SPLITS = ("train", "test")
# Times travel as int64 microseconds: tfds serialises floats as float32 (tf.train.Example), which
# would round unix seconds to 128 s steps. Unknown topic time uses a value no real time can have.
_US = 1_000_000
_NO_TIME = np.iinfo(np.int64).min


def _to_us(seconds: float) -> int:
    return int(round(seconds * _US))


@dataclasses.dataclass
class RumdectConfig(tfds.core.BuilderConfig):
    """Builder config naming the local rumdect root (holding `train/` and/or `test/`)."""

    source_dir: str = ""


def example_from_event(event: Event) -> dict:
    """The tfds example of an event. The profile travels as JSON so unknown values stay unknown
    (a sentinel such as -1 would collide with real values: Weibo's verified_type uses -1)."""
    return {
        "event_id": event.event_id,
        "topic": event.topic,
        "language": event.language,
        "label": event.label or "",
        "topic_time_us": _NO_TIME if event.topic_time is None else _to_us(event.topic_time),
        "agents": {
            "uid": [a.uid for a in event.agents],
            "time_us": [_to_us(a.time) for a in event.agents],
            "action": [a.action for a in event.agents],
            "profile": [json.dumps(a.profile(), ensure_ascii=False) for a in event.agents],
        },
    }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def event_from_example(example) -> Event:
    """Rebuild an `Event` from an example read back with `as_data_source()`."""
    agents_raw = example["agents"]
    agents = tuple(
        Agent(uid=_text(uid), time=int(time_us) / _US, action=_text(action),
              **json.loads(_text(profile)))
        for uid, time_us, action, profile in zip(agents_raw["uid"], agents_raw["time_us"],
                                                 agents_raw["action"], agents_raw["profile"]))
    topic_time_us = int(example["topic_time_us"])
    return Event(event_id=_text(example["event_id"]), topic=_text(example["topic"]),
                 agents=agents, language=_text(example["language"]),
                 label=_text(example["label"]) or None,
                 topic_time=None if topic_time_us == _NO_TIME else topic_time_us / _US)


class RumdectWeibo(tfds.core.GeneratorBasedBuilder):
    """rumdect Weibo events (Ma et al. 2016) from a local directory, one example per event."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Events with time-ordered agents and JSON profiles."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the rumdect Weibo event files in <manual_dir>/train/*.json and "
        "<manual_dir>/test/*.json, or pass RumdectConfig(source_dir=...).")
    BUILDER_CONFIGS = [RumdectConfig(name="manual", description="rumdect from the manual dir")]

    def _info(self):
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "event_id": text,
                "topic": text,
                "language": text,
                "label": text,
                "topic_time_us": tfds.features.Scalar(dtype=np.int64),
                "agents": tfds.features.Sequence({
                    "uid": text,
                    "time_us": tfds.features.Scalar(dtype=np.int64),
                    "action": text,
                    "profile": text,
                }),
            }),
            homepage="https://www.ijcai.org/Proceedings/16/Papers/537.pdf",
        )

    def _split_generators(self, dl_manager):
        source = self.builder_config.source_dir or dl_manager.manual_dir
        root = Path(source)
        splits = {s: self._generate_examples(root / s) for s in SPLITS if (root / s).is_dir()}
        if not splits:
            raise FileNotFoundError(f"no {SPLITS} folder under {root}")
        return splits

    def _generate_examples(self, directory):
        for path in list_json_files(directory):
            event = read_rumdect_event(path)
            yield event.event_id, example_from_event(event)


def make_builder(source_dir, *, data_dir, config_name: Optional[str] = None) -> RumdectWeibo:
    """A `RumdectWeibo` builder reading `source_dir` and writing under `data_dir`.

    The config name defaults to one derived from the absolute source path, so two source folders
    never share (and silently reuse) one prepared dataset.
    """
    source = Path(source_dir).resolve()
    if config_name is None:
        config_name = "dir_" + hashlib.sha1(str(source).encode("utf-8")).hexdigest()[:12]
    config = RumdectConfig(name=config_name, source_dir=str(source))
    return RumdectWeibo(config=config, data_dir=str(data_dir))
