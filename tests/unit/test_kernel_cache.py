"""The CPU kernel build cache: other builds unused for long are pruned, recent ones and this one kept."""
import os
import time

from pdserve.kernels import prune_builds


def test_prune_removes_only_long_unused_other_builds(tmp_path):
    now = time.time()
    current, recent, old = (tmp_path / f"cpu-{name}" for name in ("current", "recent", "old"))
    for path, age_days in ((current, 30), (recent, 2), (old, 20)):
        path.mkdir()
        (path / "pdserve_cpu_kernels.so").write_bytes(b"")
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    (tmp_path / "other-tool").mkdir()  # not a build folder: never touched
    os.utime(tmp_path / "other-tool", (now - 99 * 86400, now - 99 * 86400))

    assert prune_builds(current, keep_unused_s=14 * 86400) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-current", "cpu-recent", "other-tool"]
    assert now - current.stat().st_mtime < 60  # marked as used: another build's prune keeps it
