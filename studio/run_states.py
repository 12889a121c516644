"""The run-state table: the seven states a training run can be in, what each means, and the allowed moves.

Every status the registry stores, the UI shows, the API returns and the worker logs is one of these words,
and every change of status goes through `Store.transition_run`, which refuses a move this table does not
allow. Keeping the words and the moves in one place is what stops a run from reading "stopping",
"interrupted" and "stopped on request" at once.
"""

from __future__ import annotations

QUEUED, RUNNING, STOPPING, STOPPED, FINISHED, FAILED, INTERRUPTED = (
    "queued",
    "running",
    "stopping",
    "stopped",
    "finished",
    "failed",
    "interrupted",
)

# One line each: what the state means for the user and what they can do next.
MEANINGS: dict[str, str] = {
    QUEUED: "waiting for a free training slot; it starts by itself",
    RUNNING: "a worker process is training it",
    STOPPING: "Stop was pressed; the worker saves a checkpoint and ends after the current step",
    STOPPED: "stopped on request with a checkpoint saved (or taken out of the queue); Resume continues it",
    FINISHED: "trained all its steps; its model is in the Models tab, and 'Train N more' extends it",
    FAILED: "the worker ended with an error; the reason and the log tail say why, and Resume retries it",
    INTERRUPTED: "the worker was ended from outside (the studio or the computer went away); Resume continues it",
}
STATES: tuple[str, ...] = tuple(MEANINGS)

# state -> the states it may move to. Resume and 'Train N more' go back through the queue, so a worker only
# ever starts from QUEUED.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, STOPPED, FAILED}),  # started; taken out of the queue; the worker could not start
    # STOPPED straight from RUNNING: a stop request can reach the trainer before the registry says STOPPING.
    RUNNING: frozenset({STOPPING, STOPPED, FINISHED, FAILED, INTERRUPTED}),
    STOPPING: frozenset({STOPPED, FINISHED, FAILED, INTERRUPTED}),  # FINISHED: its last step came first
    STOPPED: frozenset({QUEUED}),  # Resume
    FINISHED: frozenset({QUEUED}),  # Train N more
    FAILED: frozenset({QUEUED}),  # Resume
    INTERRUPTED: frozenset({QUEUED}),  # Resume
}

ACTIVE: tuple[str, ...] = (RUNNING, STOPPING)  # a worker process should be alive
RESUMABLE: tuple[str, ...] = (STOPPED, FAILED, INTERRUPTED)  # Resume continues from the last checkpoint
EXTENDABLE: tuple[str, ...] = (FINISHED,)  # 'Train N more' continues past the end


def can_move(old: str, new: str) -> bool:
    """True if the table allows a run in `old` to become `new`."""
    return new in TRANSITIONS.get(old, frozenset())


def sources(new: str) -> tuple[str, ...]:
    """The states from which a run may move to `new`, in table order."""
    return tuple(state for state in STATES if can_move(state, new))


def describe(state: str) -> str:
    """'stopped: stopped on request ...' for messages; an unknown word is named as such, not hidden."""
    return f"{state}: {MEANINGS[state]}" if state in MEANINGS else f"{state}: not a state this studio knows"
