"""Tests for the synthetic log generator: determinism, sizes, popularity skew, learnable structure."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pa_csv
import pytest

from cluster.config import ConfigError, load_config
from data_pipeline.synthetic import CSV_HEADER, GenerateConfig, build_world, generate, main


def _read(path):
    """(user, item, timestamp, rating) numpy arrays, sorted by user then time."""
    table = pa_csv.read_csv(path)
    users = np.array([int(u[1:]) for u in table["user"].to_pylist()])
    items = np.array([int(i[1:]) for i in table["item"].to_pylist()])
    stamps = table["timestamp"].to_numpy()
    ratings = table["rating"].to_numpy()
    order = np.lexsort((stamps, users))
    return users[order], items[order], stamps[order], ratings[order]


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory):
    """The default (demo-sized) log, generated once for the module."""
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(GenerateConfig, None, [f"output_dir={out}", "with_item_text=true"])
    return cfg, generate(cfg)


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    def run(name, seed):
        cfg = GenerateConfig(
            output_dir=str(tmp_path / name), seed=seed, num_users=300, num_items=200, num_topics=10,
            with_item_text=True, chunk_users=128,
        )  # fmt: skip
        generate(cfg)
        return (tmp_path / name / "interactions.csv").read_bytes(), (
            tmp_path / name / "items.jsonl"
        ).read_bytes()

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]


def test_sizes_and_per_user_invariants(demo_log):
    cfg, path = demo_log
    assert path.read_text().startswith(CSV_HEADER)
    users, items, stamps, ratings = _read(path)
    assert sorted(set(users.tolist())) == list(range(cfg.num_users))
    assert items.min() >= 0 and items.max() < cfg.num_items
    lengths = np.bincount(users)
    assert lengths.min() >= cfg.min_seq_len and lengths.max() <= cfg.max_events_per_user
    assert abs(lengths.mean() - cfg.mean_seq_len) < 0.15 * cfg.mean_seq_len
    same_user = np.diff(users) == 0
    assert (np.diff(stamps)[same_user] > 0).all(), "timestamps must strictly increase within a user"
    # Sessions: most gaps are short (within a session), some are long (between sessions).
    gaps = np.diff(stamps)[same_user]
    assert 0.5 < (gaps < 3600).mean() < 0.97
    assert set(np.unique(ratings).tolist()) <= {1, 2, 3, 4, 5}
    assert (path.parent / "generate_config.yaml").is_file()


def test_popularity_is_zipf_like(demo_log):
    cfg, path = demo_log
    _, items, _, _ = _read(path)
    counts = np.sort(np.bincount(items, minlength=cfg.num_items))[::-1]
    top_share = counts[: cfg.num_items // 10].sum() / counts.sum()
    assert top_share > 0.35, f"top 10% of items take only {top_share:.2f} of events"
    # ... yet the tail is not empty: most items are seen.
    assert (counts > 0).mean() > 0.9


def test_first_order_transitions_beat_popularity(demo_log):
    """A count-matrix item->next-item model fit on 80% of each sequence must hit the last item far
    more often than the most popular items do (HR@10 at least 2x): the log has sequential signal."""
    cfg, path = demo_log
    users, items, _, _ = _read(path)
    starts = np.flatnonzero(np.r_[True, np.diff(users) != 0])
    ends = np.r_[starts[1:], len(users)]
    transitions = np.zeros((cfg.num_items, cfg.num_items))
    popularity = np.zeros(cfg.num_items)
    for s, e in zip(starts, ends):
        fit = items[s : s + int(0.8 * (e - s))]
        np.add.at(transitions, (fit[:-1], fit[1:]), 1.0)
        np.add.at(popularity, fit, 1.0)
    top_popular = np.argsort(-popularity, kind="stable")[:10]
    # Popularity breaks ties between transition counts, so rows with few counts still rank 10 items.
    scores = transitions + 1e-6 * popularity / popularity.max()
    hits_transition = hits_popular = 0
    for e in ends:
        target, previous = items[e - 1], items[e - 2]
        hits_popular += target in top_popular
        hits_transition += target in np.argsort(-scores[previous], kind="stable")[:10]
    hr_transition, hr_popular = hits_transition / len(starts), hits_popular / len(starts)
    assert hr_transition >= 2.0 * hr_popular, (hr_transition, hr_popular)
    assert hr_transition > 0.3


def test_row_order_and_chunking_only_change_layout(tmp_path):
    base = dict(num_users=250, num_items=120, num_topics=8, chunk_users=100)
    tables = {}
    for order in ("time", "user", "random"):
        cfg = GenerateConfig(output_dir=str(tmp_path / order), row_order=order, **base)
        tables[order] = pa_csv.read_csv(generate(cfg))
    rows = {k: sorted(zip(*(t[c].to_pylist() for c in t.column_names))) for k, t in tables.items()}
    assert rows["time"] == rows["user"] == rows["random"]
    user_col = [int(u[1:]) for u in tables["user"]["user"].to_pylist()]
    assert user_col == sorted(user_col)
    stamps = tables["time"]["timestamp"].to_numpy()
    # "time" sorts within each chunk of chunk_users users; chunk 0 holds users 0..99.
    chunk0 = np.array([int(u[1:]) < 100 for u in tables["time"]["user"].to_pylist()])
    assert (np.diff(stamps[chunk0]) >= 0).all()


def test_item_text_follows_topics(demo_log):
    cfg, path = demo_log
    records = [json.loads(line) for line in (path.parent / "items.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records] == [f"i{i}" for i in range(cfg.num_items)]
    assert all(set(r) == {"item", "title", "brand", "categories", "description"} for r in records)
    world = build_world(cfg)
    topic_of_label = {}
    for item, record in enumerate(records):
        label = tuple(record["categories"])
        topic_of_label.setdefault(label, set()).add(int(world.item_topic[item]))
        assert record["brand"] in record["title"]
    # One (category, topic) label per latent topic, and every topic has its own label.
    assert all(len(topics) == 1 for topics in topic_of_label.values())
    assert len(topic_of_label) == cfg.num_topics


def test_cli_and_validation(tmp_path, capsys):
    yaml_path = tmp_path / "gen.yaml"
    yaml_path.write_text(f"output_dir: {tmp_path / 'out'}\nnum_users: 50\nnum_items: 40\nnum_topics: 4\n")
    assert main(["--config", str(yaml_path), "mean_seq_len=12"]) == 0
    users, _, _, _ = _read(tmp_path / "out" / "interactions.csv")
    assert len(set(users.tolist())) == 50
    assert "interactions.csv" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="num_topics"):
        load_config(GenerateConfig, None, ["num_items=5", "num_topics=10"])
    with pytest.raises(ConfigError, match="p_topic"):
        load_config(GenerateConfig, None, ["p_series=0.7", "p_topic=0.5"])
    with pytest.raises(ConfigError, match="row_order"):
        load_config(GenerateConfig, None, ["row_order=sorted"])
