"""The demo's cache: an artifact per profile definition, older definitions' artifacts removed, nothing else."""

from aloe.demo import _demo_paths
from aloe.obfuscation.profiles import PROFILES


def test_demo_artifact_follows_the_profile_definition(tmp_path):
    work = tmp_path / "demo"
    work.mkdir()
    (work / "balanced").mkdir()                     # an artifact of an older definition, and its secret
    (work / "balanced.secret").write_text("{}")
    (work / "balanced-0123456789ab").mkdir()
    (work / "exact").mkdir()                        # another profile's: kept
    (work / "balanced-notes.txt").write_text("x")   # not the demo's: kept
    out, secret = _demo_paths(work, PROFILES["balanced"])
    assert out.parent == work and secret == work / f"{out.name}.secret"
    assert sorted(p.name for p in work.iterdir()) == ["balanced-notes.txt", "exact"]
    changed = PROFILES["balanced"].with_overrides(name="balanced", alpha_e=0.5)
    out.mkdir()
    secret.write_text("{}")
    out2, _ = _demo_paths(work, changed)
    assert out2 != out and not out.exists() and not secret.exists()
    assert _demo_paths(work, PROFILES["balanced"])[0] == out   # the same definition: the same place
