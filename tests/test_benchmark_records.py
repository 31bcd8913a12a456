"""What the full-budget privacy benchmark records beside each figure: the code it was measured with, and which
stored figures a changed budget knob makes stale."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from privacy import stale_attacks  # noqa: E402
from privacy_full import source_revision  # noqa: E402


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_each_figure_names_the_commit_and_whether_the_code_had_changed(tmp_path):
    assert source_revision(tmp_path) is None                        # not a checkout: nothing claimed
    git(tmp_path, "init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("text\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert source_revision(tmp_path) == head and len(head) == 12
    (tmp_path / "notes.md").write_text("other text\n")               # not code: the figure is still the commit's
    assert source_revision(tmp_path) == head
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert source_revision(tmp_path) == head + "+changes"


@pytest.mark.parametrize(("knob", "value", "stale"), [
    ("decode_swaps", 2, {"decoded", "sda-decoded"}),
    ("sda_steps", 10, {"sda", "sda-decoded"}),
    ("learned_steps", 10, {"learned", "decoded", "key-regression"}),
    ("keyreg_rounds", 5, {"key-regression"}),
])
def test_a_changed_knob_stales_only_the_attacks_it_drives(knob, value, stale):
    old = {"decode_swaps": 0, "sda_steps": 2000, "learned_steps": 400, "keyreg_rounds": 3}
    assert stale_attacks(old, {**old, knob: value}) == stale
    assert stale_attacks(old, dict(old)) == set()
    # a knob added since the stored run stales nothing: those figures used its default
    assert stale_attacks(old, {**old, "decode_from_victim": 3}) == set()


def test_the_gemma3_frontier_reads_its_points_and_refuses_bad_ones():
    from gemma3_frontier import parse_point, point_key

    assert parse_point("0.1:0.03") == (0.1, 0.03, "entry")
    assert point_key(*parse_point("1:0.3:row")) == "1:0.3:row"
    for bad in ("0.1", "a:b", "0.1:0.03:diag", "-1:0", "0.1:0.03:row:x"):
        with pytest.raises(SystemExit, match="bad point"):
            parse_point(bad)
