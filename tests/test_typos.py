"""The commonest mistakes on the command line are one sentence naming the nearest key or option and the range,
exit status 2, before Hydra prints its own text (imm/launch/overrides.py). In-process against a real Hydra
compose of conf/ (every case), and through launch.py for the exit status and an untouched launch directory."""

from __future__ import annotations

import helpers
import pytest
from helpers import compose_cfg

from imm.launch import overrides

CASES = {
    "misspelled key": (
        ["train.step=300"],
        "train.step=300 is not a key of train; the nearest is train.steps: use train.steps=300.",
    ),
    "misspelled key of an option's node": (
        ["arch.nam=x"],
        "arch.nam=x is not a key of arch; the nearest is arch.name: use arch.name=x.",
    ),
    "not an integer": (["train.steps=3k"], "train.steps=3k is not an integer; train.steps must be >= 1."),
    "not a number": (["optim.lr=3e-4x"], "optim.lr=3e-4x is not a number; optim.lr must be > 0."),
    "a float for an integer": (
        ["loss.k=1.5"],
        "loss.k=1.5 is not an integer; loss.k must be in [1, 24] (the paper uses 12 to 15).",
    ),
    "not a list of integers": (
        ["eval.steps=[1,x]"],
        "eval.steps=[1,x] is not a list of integers; eval.steps must be a list of at least 1 value, each >= 1.",
    ),
    "not true or false": (["train.compile=maybe"], "train.compile=maybe is not true or false."),
    "misspelled option": (
        ["data=checkerbord"],
        "data=checkerbord is not an option of data (conf/data/ has no checkerbord.yaml); the nearest is"
        " data=checkerboard.",
    ),
    "a sweep without its +": (
        ["sweep=kab"],
        "sweep=kab adds a config group the default config does not list: write +sweep=kab.",
    ),
    "an unreadable override": (
        ["train.steps=[1"],
        "train.steps=[1 cannot be read as key=value (no viable alternative at input '[1'); quote a value that holds"
        " spaces, brackets or commas, e.g. 'eval.steps=[1,2,4]'.",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_mistake_is_one_sentence(case):
    typed, expected = CASES[case]
    with pytest.raises(Exception) as e:
        compose_cfg(*typed)
    assert overrides.sentence(e.value, typed) == expected


def test_a_misspelled_command_and_a_key_of_a_commands_config():
    with pytest.raises(Exception) as e:
        compose_cfg(config_name="sampl")
    assert overrides.sentence(e.value, []) == (
        "--config-name sampl names no command; use sample, evaluate or encode (or leave it out to train)."
    )
    with pytest.raises(Exception) as e:
        compose_cfg("stepz=3", config_name="sample")
    assert (
        overrides.sentence(e.value, ["stepz=3"])
        == "stepz=3 is not a key of the config; the nearest is steps: use steps=3."
    )


def test_through_launch_py_exit_2_one_line_and_nothing_written(tmp_path):
    for typed in (["train.step=300"], ["-m", "data=moons,checkerbord"]):
        proc = helpers.launch(tmp_path, *typed, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, lines
        assert "the nearest is" in lines[0]
        assert list(tmp_path.iterdir()) == []  # no run directory, no sweep directory, no MLflow store
