"""``-q``/``-v``: results on stdout, notes and details on stderr, progress bars hidden by -q."""

import click
import pytest
from click.testing import CliRunner

from pddnet.cli import main
from pddnet.cli import output as O


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("PDDNET_VERBOSITY",):
        monkeypatch.delenv(k, raising=False)


@click.command("probe-output")
def _probe():
    from pddnet._progress import progress_bar

    O.say("result")
    O.note("a note")
    O.detail("a detail")
    click.echo(f"bar disabled: {progress_bar(range(2)).disable}")


@pytest.fixture
def run():
    main.add_command(_probe)
    yield lambda *a: CliRunner().invoke(main, list(a))
    main.commands.pop("probe-output")


@pytest.mark.parametrize("flags, notes, details, bar_off", [
    ((), True, False, False), (("-q",), False, False, True), (("-v",), True, True, False)])
def test_levels(run, flags, notes, details, bar_off):
    res = run(*flags, "probe-output")
    assert res.exit_code == 0, res.output + res.stderr
    assert res.stdout.splitlines()[0] == "result"          # results: stdout, always
    assert f"bar disabled: {bar_off}" in res.stdout
    assert ("a note" in res.stderr) is notes and "a note" not in res.stdout
    assert ("a detail" in res.stderr) is details and "a detail" not in res.stdout


def test_v_and_q_together_is_a_usage_error(run):
    res = run("-v", "-q", "probe-output")
    assert res.exit_code == 2 and "contradict" in res.stderr


def test_explicitly_disabled_bars_stay_disabled():
    from pddnet._progress import progress_bar

    O.set_verbosity(O.VERBOSE)
    assert progress_bar(range(2), disable=True).disable
    assert not progress_bar(range(2)).disable
