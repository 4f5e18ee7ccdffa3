"""Synthetic interaction logs with structure a sequential recommender can learn.

    python -m data_pipeline generate                          # demo size -> data/synthetic/
    python -m data_pipeline generate output_dir=/tmp/syn num_users=170000 num_items=100000 num_topics=1000
    python -m data_pipeline generate --config my_generate.yaml seed=3   # YAML with GenerateConfig fields

Writes ``<output_dir>/interactions.csv`` (header ``user,item,timestamp,rating``; raw ids like ``u12``
and ``i345``), ``<output_dir>/items.jsonl`` unless ``with_item_text=false``, and
``<output_dir>/generate_config.yaml`` (the resolved config). The output is a pure function of the
config: the same config gives the same bytes.

How the log is made (why a sequential model beats popularity on it):

* Items belong to ``num_topics`` latent topics; topics are grouped into categories. Global item
  popularity is Zipf (``zipf_exponent``), and the popularity rank is independent of the raw id.
* Each user has a home topic. A user's next item, given the previous one, is
  - with ``p_series``: the next item of the previous item's "series" (a fixed cycle through the
    items of a topic), i.e. an almost deterministic item -> item transition;
  - with ``p_topic``: a popular item of the previous topic or of one of its three successor topics
    (two in the same category, one anywhere) -- a topic-level Markov chain;
  - otherwise: an item drawn from global popularity (noise a popularity baseline captures).
  When a new session starts, the user goes back to the home topic with ``p_home_at_session_start``.
* Timestamps come in sessions: short exponential gaps inside a session, long gaps between sessions.
* Ratings are 1-5, higher for items of the user's home topic.
* Item text (title, brand, categories, description) is built from words of the item's topic and
  category, so text embeddings and semantic ids built from it carry the topic structure.

Generation is vectorised over users and chunked by ``chunk_users`` users, so memory depends on the
chunk size, not on the total size; 10M events take well under a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from cluster.config import ConfigError, load_config, save_config

logger = logging.getLogger(__name__)

CSV_HEADER = "user,item,timestamp,rating\n"

# Topic-level transition: stay in the previous topic, or go to one of its three successors.
_TOPIC_STEP_PROBS = np.array([0.4, 0.3, 0.2, 0.1])


@dataclass
class GenerateConfig:
    """Everything that determines a synthetic log (the output is a function of these fields)."""

    output_dir: str = "data/synthetic"
    seed: int = 0
    num_users: int = 2000
    num_items: int = 1000
    # Events per user: min_seq_len + lognormal with this overall mean, capped at max_events_per_user.
    mean_seq_len: float = 60.0
    min_seq_len: int = 5
    max_events_per_user: int = 1000
    seq_len_sigma: float = 0.8
    num_topics: int = 50
    zipf_exponent: float = 1.0
    p_series: float = 0.3
    p_topic: float = 0.5
    p_home_at_session_start: float = 0.5
    mean_session_len: float = 8.0
    mean_gap_in_session_s: float = 180.0
    mean_gap_between_sessions_s: float = 3 * 86400.0
    start_timestamp: int = 1_600_000_000
    # Users start uniformly within this many days after start_timestamp.
    start_spread_days: float = 365.0
    # "time": rows of each chunk sorted by timestamp (like an append-only log); "user": grouped by
    # user, chronological; "random": shuffled within each chunk.
    row_order: Literal["time", "user", "random"] = "time"
    # items.jsonl (title, brand, categories, description); on by default because the TIGER demo needs it.
    with_item_text: bool = True
    chunk_users: int = 20_000

    def validate(self) -> None:
        """Reject values the generator cannot honour."""
        for key in ("num_users", "num_items", "num_topics", "chunk_users", "min_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"got {getattr(self, key)}, expected >= 1")
        if self.num_topics > self.num_items:
            raise ConfigError("num_topics", f"got {self.num_topics}, must be <= num_items ({self.num_items})")
        if self.max_events_per_user < self.min_seq_len:
            raise ConfigError(
                "max_events_per_user", f"got {self.max_events_per_user}, must be >= min_seq_len"
            )
        if not self.min_seq_len < self.mean_seq_len <= self.max_events_per_user:
            raise ConfigError(
                "mean_seq_len",
                f"got {self.mean_seq_len}, expected min_seq_len < mean_seq_len <= max_events_per_user",
            )
        for key in ("p_series", "p_topic", "p_home_at_session_start"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(key, f"got {getattr(self, key)}, expected a probability in [0, 1]")
        if self.p_series + self.p_topic > 1.0:
            raise ConfigError("p_topic", "p_series + p_topic must be <= 1 (the rest is popularity noise)")
        for key in ("mean_session_len", "mean_gap_in_session_s", "mean_gap_between_sessions_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"got {getattr(self, key)}, expected > 0")
        if self.mean_session_len < 1:
            raise ConfigError("mean_session_len", f"got {self.mean_session_len}, expected >= 1")
        if self.zipf_exponent < 0 or self.seq_len_sigma < 0 or self.start_spread_days < 0:
            raise ConfigError("zipf_exponent", "zipf_exponent, seq_len_sigma, start_spread_days must be >= 0")


@dataclass
class World:
    """The fixed item universe: topics, popularity, series and topic transitions."""

    item_topic: np.ndarray  # [num_items] topic of each item
    item_weight: np.ndarray  # [num_items] Zipf popularity weight
    topic_category: np.ndarray  # [num_topics]
    topic_next: np.ndarray  # [num_topics, 4]: itself, then three successor topics
    series_next: np.ndarray  # [num_items] next item in the item's series
    topic_items: np.ndarray  # item ids grouped by topic
    topic_keys: np.ndarray  # topic + within-topic CDF, aligned with topic_items (for searchsorted)
    global_cdf: np.ndarray  # [num_items] CDF of item_weight
    home_topic_cdf: np.ndarray  # [num_topics] CDF for drawing a user's home topic


def build_world(cfg: GenerateConfig) -> World:
    """Draw the item universe from ``cfg.seed`` (independent of the number of users)."""
    rng = np.random.default_rng([cfg.seed, 0])
    num_items, num_topics = cfg.num_items, cfg.num_topics
    # Every topic gets items (sizes differ by at most one), in random positions.
    item_topic = rng.permutation(np.arange(num_items) % num_topics)
    popularity_rank = rng.permutation(num_items)
    item_weight = 1.0 / (popularity_rank + 1.0) ** cfg.zipf_exponent

    num_categories = max(1, round(math.sqrt(num_topics)))
    topic_category = rng.permutation(np.arange(num_topics) % num_categories)
    topic_next = np.empty((num_topics, 4), dtype=np.int64)
    for topic in range(num_topics):
        same = np.flatnonzero((topic_category == topic_category[topic]) & (np.arange(num_topics) != topic))
        others = np.flatnonzero(np.arange(num_topics) != topic)
        if len(others) == 0:
            others = np.array([topic])
        if len(same) == 0:
            same = others
        near = rng.choice(same, size=2, replace=len(same) < 2)
        topic_next[topic] = [topic, near[0], near[1], rng.choice(others)]

    # Items grouped by topic; the key t + CDF_within_t lets one searchsorted draw from any topic.
    topic_items = np.lexsort((rng.random(num_items), item_topic))
    series_next = np.empty(num_items, dtype=np.int64)
    topic_keys = np.empty(num_items, dtype=np.float64)
    topic_starts = np.searchsorted(item_topic[topic_items], np.arange(num_topics + 1))
    for topic in range(num_topics):
        members = topic_items[topic_starts[topic] : topic_starts[topic + 1]]
        series_next[members] = np.roll(members, -1)
        cdf = np.cumsum(item_weight[members])
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        topic_keys[topic_starts[topic] : topic_starts[topic + 1]] = topic + cdf
    global_cdf = np.cumsum(item_weight)
    global_cdf /= global_cdf[-1]
    topic_weight = np.bincount(item_topic, weights=item_weight, minlength=num_topics)
    home_topic_cdf = np.cumsum(topic_weight) / topic_weight.sum()
    return World(
        item_topic=item_topic,
        item_weight=item_weight,
        topic_category=topic_category,
        topic_next=topic_next,
        series_next=series_next,
        topic_items=topic_items,
        topic_keys=topic_keys,
        global_cdf=global_cdf,
        home_topic_cdf=home_topic_cdf,
    )


def _draw_in_topic(world: World, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One popularity-weighted item per entry of ``topics`` (``u`` uniform in [0, 1))."""
    idx = np.searchsorted(world.topic_keys, topics + u, side="right")
    return world.topic_items[np.minimum(idx, len(world.topic_items) - 1)]


def _draw_popular(world: World, u: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(world.global_cdf, u, side="right")
    return np.minimum(idx, len(world.global_cdf) - 1)


def _user_lengths(cfg: GenerateConfig, rng: np.random.Generator, num: int) -> np.ndarray:
    extra_mean = cfg.mean_seq_len - cfg.min_seq_len
    mu = math.log(extra_mean) - cfg.seq_len_sigma**2 / 2
    lengths = cfg.min_seq_len + np.floor(rng.lognormal(mu, cfg.seq_len_sigma, num)).astype(np.int64)
    return np.clip(lengths, cfg.min_seq_len, cfg.max_events_per_user)


def generate_chunk(
    cfg: GenerateConfig, world: World, chunk_index: int, first_user: int, num_users: int
) -> pa.Table:
    """Events of users ``first_user .. first_user + num_users - 1`` as an Arrow table."""
    rng = np.random.default_rng([cfg.seed, 1, chunk_index])
    lengths = _user_lengths(cfg, rng, num_users)
    home = np.searchsorted(world.home_topic_cdf, rng.random(num_users), side="right")
    home = np.minimum(home, cfg.num_topics - 1)
    start = cfg.start_timestamp + (rng.random(num_users) * cfg.start_spread_days * 86400).astype(np.int64)

    # Longest users first, so the users still active at step t are always a prefix.
    by_length = np.argsort(-lengths, kind="stable")
    lengths, home, start = lengths[by_length], home[by_length], start[by_length]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    num_events = int(offsets[-1])
    # num_active[t] = number of users with more than t events (lengths are sorted descending).
    num_active = np.searchsorted(-lengths, -np.arange(int(lengths[0])), side="left")
    items = np.empty(num_events, dtype=np.int64)
    stamps = np.empty(num_events, dtype=np.int64)

    step_cdf = np.cumsum(_TOPIC_STEP_PROBS)
    p_new_session = 1.0 / cfg.mean_session_len
    prev_item = _draw_in_topic(world, home, rng.random(num_users))
    prev_ts = start.copy()
    items[offsets[:-1]] = prev_item
    stamps[offsets[:-1]] = prev_ts
    for t in range(1, int(lengths[0])):
        n = int(num_active[t])
        prev = prev_item[:n]
        prev_topic = world.item_topic[prev]
        mode = rng.random(n)
        step = np.minimum(np.searchsorted(step_cdf, rng.random(n), side="right"), 3)
        topic_item = _draw_in_topic(world, world.topic_next[prev_topic, step], rng.random(n))
        popular_item = _draw_popular(world, rng.random(n))
        item = np.where(
            mode < cfg.p_series,
            world.series_next[prev],
            np.where(mode < cfg.p_series + cfg.p_topic, topic_item, popular_item),
        )
        new_session = rng.random(n) < p_new_session
        go_home = new_session & (rng.random(n) < cfg.p_home_at_session_start)
        item = np.where(go_home, _draw_in_topic(world, home[:n], rng.random(n)), item)
        gap = np.where(
            new_session,
            rng.exponential(cfg.mean_gap_between_sessions_s, n),
            rng.exponential(cfg.mean_gap_in_session_s, n),
        )
        # +1 s keeps each user's timestamps strictly increasing, so the true order is unambiguous.
        ts = prev_ts[:n] + 1 + gap.astype(np.int64)
        items[offsets[:n] + t] = item
        stamps[offsets[:n] + t] = ts
        prev_item[:n] = item
        prev_ts[:n] = ts

    user_ids = np.repeat(first_user + by_length, lengths)
    in_home = world.item_topic[items] == np.repeat(home, lengths)
    rating_score = 3.4 + 1.0 * in_home + rng.normal(0.0, 0.9, num_events)
    ratings = np.clip(np.rint(rating_score), 1, 5).astype(np.int8)

    if cfg.row_order == "time":
        order = np.lexsort((user_ids, stamps))
    elif cfg.row_order == "user":
        order = np.argsort(user_ids, kind="stable")
    else:
        order = rng.permutation(num_events)
    return pa.table(
        {
            "user": _prefixed("u", user_ids[order]),
            "item": _prefixed("i", items[order]),
            "timestamp": pa.array(stamps[order]),
            "rating": pa.array(ratings[order]),
        }
    )


def _prefixed(prefix: str, ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "")


def generate(cfg: GenerateConfig) -> Path:
    """Write the synthetic log described by ``cfg``; return the path of ``interactions.csv``."""
    cfg.validate()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    began = time.perf_counter()
    path = out_dir / "interactions.csv"
    tmp = out_dir / "interactions.csv.tmp"
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    num_events = 0
    with open(tmp, "wb") as sink:
        sink.write(CSV_HEADER.encode())
        for chunk_index, first_user in enumerate(range(0, cfg.num_users, cfg.chunk_users)):
            num = min(cfg.chunk_users, cfg.num_users - first_user)
            table = generate_chunk(cfg, world, chunk_index, first_user, num)
            pa_csv.write_csv(table, sink, write_options=options)
            num_events += table.num_rows
    os.replace(tmp, path)
    if cfg.with_item_text:
        write_item_text(cfg, world, out_dir / "items.jsonl")
    save_config(cfg, out_dir / "generate_config.yaml")
    seconds = time.perf_counter() - began
    logger.info(
        "wrote %s: %d events, %d users, %d items in %.1f s (%.2fM events/s)",
        path,
        num_events,
        cfg.num_users,
        cfg.num_items,
        seconds,
        num_events / max(seconds, 1e-9) / 1e6,
    )
    return path


# --- item text ----------------------------------------------------------------------------------

_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "s", "x", "l"]
_NOUNS = ["set", "kit", "pack", "edition", "collection", "bundle", "case", "tool", "guide", "mix"]
_ADJECTIVES = ["classic", "compact", "deluxe", "handy", "lightweight", "premium", "portable", "durable"]


def _word(rng: np.random.Generator, syllables: int, used: set[str]) -> str:
    """A pronounceable made-up word not in ``used`` (added to it): names must not collide."""
    while True:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
        word = ("".join(parts) + rng.choice(_CODAS)).capitalize()
        if word not in used:
            used.add(word)
            return word


def write_item_text(cfg: GenerateConfig, world: World, path: Path) -> None:
    """Write ``items.jsonl``: one JSON object per item, with words taken from its topic and category."""
    rng = np.random.default_rng([cfg.seed, 2])
    num_categories = int(world.topic_category.max()) + 1
    used: set[str] = set()
    category_names = [_word(rng, 2, used) for _ in range(num_categories)]
    category_nouns = [[_word(rng, 2, used).lower() for _ in range(3)] for _ in range(num_categories)]
    topic_names = [_word(rng, 3, used) for _ in range(cfg.num_topics)]
    topic_words = [[_word(rng, 2, used).lower() for _ in range(6)] for _ in range(cfg.num_topics)]
    topic_brands = [[_word(rng, 2, used) for _ in range(3)] for _ in range(cfg.num_topics)]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for item in range(cfg.num_items):
            topic = int(world.item_topic[item])
            category = int(world.topic_category[topic])
            words = topic_words[topic]
            pick = rng.choice(len(words), size=3, replace=False)
            brand = topic_brands[topic][rng.integers(3)]
            noun = category_nouns[category][rng.integers(3)]
            record = {
                "item": f"i{item}",
                "title": f"{brand} {words[pick[0]].capitalize()} {words[pick[1]].capitalize()} {noun} {rng.integers(1, 1000)}",
                "brand": brand,
                "categories": [category_names[category], topic_names[topic]],
                "description": (
                    f"A {rng.choice(_ADJECTIVES)} {noun} {rng.choice(_NOUNS)} from {brand} for "
                    f"{words[pick[2]]} and {words[pick[0]]}. Part of the {topic_names[topic]} "
                    f"line in {category_names[category]}."
                ),
            }
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline generate [--config FILE] [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", help="YAML file with GenerateConfig fields (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_users=10000")
    args = parser.parse_args(argv)
    cfg = load_config(GenerateConfig, args.config, args.overrides)
    path = generate(cfg)
    print(path)
    return 0
