"""Generated tasks: reproducible, disjoint train / held-out splits; answers follow each task's rule."""

from __future__ import annotations

import pytest

from lorafleet.training.tasks import TASKS, PersonaTask, exact_match


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_reproducible_and_disjoint(name):
    task = TASKS[name]
    train, heldout = task.split(seed=3, num_train=200, num_heldout=40)
    again = task.split(seed=3, num_train=200, num_heldout=40)
    other = task.split(seed=4, num_train=200, num_heldout=40)
    assert (train, heldout) == again and train != other[0]
    assert len(train) == 200 and len(heldout) == 40
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert all(e.prompt and e.answer for e in train + heldout)


def test_answers_follow_the_rules():
    upper, _ = TASKS["upper"].split(0, 20, 1)
    assert all(e.answer == e.prompt.upper() and e.answer != e.prompt for e in upper)
    reverse, _ = TASKS["reverse"].split(0, 20, 1)
    assert all(e.answer.split() == e.prompt.split()[::-1] for e in reverse)
    persona, _ = TASKS["persona"].split(0, 20, 1)
    assert {e.answer for e in persona} == {PersonaTask.ANSWER} and len({e.prompt for e in persona}) == 20
    sql, _ = TASKS["sql"].split(0, 50, 1)
    for e in sql:
        table = next(w for w in e.answer.replace(";", " ").split() if w in e.prompt.split() or f"{w}." in e.prompt)
        assert e.answer.startswith("SELECT ") and e.answer.endswith(";") and table


def test_exact_match_is_whole_string():
    assert exact_match(" SELECT 1; \n", "SELECT 1;")
    assert not exact_match("SELECT 1; -- and more", "SELECT 1;")
    assert not exact_match("select 1;", "SELECT 1;")


def test_asking_for_more_distinct_prompts_than_a_task_has_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot draw"):
        TASKS["sql"].split(0, 100_000, 10)
