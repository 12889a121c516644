"""The run-state table: its shape, every transition through the registry's compare-and-set, and the words the UI shows."""

import itertools
import sqlite3

import pytest

from studio import run_states as rs
from studio.store import Store

EXPECTED_STATES = ("queued", "running", "stopping", "stopped", "finished", "failed", "interrupted")


def test_the_seven_states_each_have_a_meaning_and_a_row():
    assert rs.STATES == EXPECTED_STATES
    assert set(rs.TRANSITIONS) == set(rs.STATES)
    assert all(targets <= set(rs.STATES) for targets in rs.TRANSITIONS.values())
    assert all(rs.MEANINGS[state].strip() and "\n" not in rs.MEANINGS[state] for state in rs.STATES)
    assert all(state not in rs.TRANSITIONS[state] for state in rs.STATES)  # a move always changes the word


def test_groups_follow_the_table():
    assert rs.ACTIVE == ("running", "stopping")
    assert rs.RESUMABLE == ("stopped", "failed", "interrupted") and rs.EXTENDABLE == ("finished",)
    for state in (*rs.RESUMABLE, *rs.EXTENDABLE):
        assert rs.TRANSITIONS[state] == {"queued"}, f"{state}: Resume and 'Train N more' go through the queue"
    assert rs.sources("running") == ("queued",)  # a worker only ever starts a queued run


def test_every_state_is_reachable_from_queued_and_every_ending_can_be_queued_again():
    reached, frontier = {"queued"}, ["queued"]
    while frontier:
        for target in rs.TRANSITIONS[frontier.pop()] - reached:
            reached.add(target)
            frontier.append(target)
    assert reached == set(rs.STATES)
    for state in set(rs.STATES) - set(rs.ACTIVE) - {"queued"}:
        assert rs.can_move(state, "queued"), state


def _run_in(store: Store, status: str) -> str:
    """A fresh run put straight into `status` (bypassing the table: only the move under test is checked)."""
    run_id = store.create_run(f"in {status}", "{}")["id"]
    db = sqlite3.connect(store.db_path, isolation_level=None)
    db.execute("UPDATE runs SET status = ? WHERE id = ?", (status, run_id))
    db.close()
    return run_id


def test_registry_allows_exactly_the_moves_of_the_table(tmp_path):
    store = Store(tmp_path)
    allowed = refused = 0
    for old, new in itertools.product(rs.STATES, repeat=2):
        run_id = _run_in(store, old)
        moved = store.transition_run(run_id, new, exit_reason=f"{old} -> {new}")
        after = store.get_run(run_id)
        if rs.can_move(old, new):
            allowed += 1
            assert moved and after["status"] == new and after["exit_reason"] == f"{old} -> {new}", (old, new)
        else:
            refused += 1
            assert not moved and after["status"] == old and after["exit_reason"] is None, (old, new)
    assert allowed == sum(len(targets) for targets in rs.TRANSITIONS.values())
    assert allowed + refused == len(rs.STATES) ** 2 and refused > allowed


def test_expected_narrows_the_table_and_an_impossible_one_is_a_mistake(tmp_path):
    store = Store(tmp_path)
    stopping = _run_in(store, "stopping")
    assert not store.transition_run(stopping, "failed", ["running"])  # legal from stopping, but not asked for
    assert store.get_run(stopping)["status"] == "stopping"
    with pytest.raises(ValueError, match="cannot move from \\['queued'\\] to 'finished'"):
        store.transition_run(stopping, "finished", ["queued"])


def test_describe_names_unknown_words_instead_of_hiding_them():
    assert rs.describe("stopped").startswith("stopped: stopped on request")
    assert rs.describe("paused") == "paused: not a state this studio knows"


def test_metrics_run_pickers_follow_status_changes(tmp_path):
    """The labels carry the state word; the timer renews them when it changes and leaves them alone otherwise."""
    import gradio as gr

    from studio.app import Services
    from studio.jobs import JobManager
    from studio.tabs import metrics

    store = Store(tmp_path)
    services = Services(store=store, jobs=JobManager(store))
    run_id = store.create_run("r", "{}")["id"]
    shown = metrics.run_options(services)
    assert shown == [("r · queued", run_id)]
    outputs = metrics.tick(services, [run_id], None, shown)
    assert all(picker == gr.skip() for picker in outputs[-1 - metrics.PICKERS : -1])
    store.transition_run(run_id, "running")
    store.transition_run(run_id, "stopping")
    store.transition_run(run_id, "stopped")
    outputs = metrics.tick(services, [run_id], outputs[len(metrics.CHART_NAMES) + 1], shown)
    assert outputs[-1] == [("r · stopped", run_id)]
    assert all(picker.choices == [("r · stopped", run_id)] for picker in outputs[-1 - metrics.PICKERS : -1])
