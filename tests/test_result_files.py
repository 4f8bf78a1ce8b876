"""Result JSONs are readable by others (mode 0644), like any file a tool writes for people to share."""

import stat

from kdbench.results import write_result


def test_result_json_is_world_readable(tmp_path):
    path = tmp_path / "runs" / "r.json"
    write_result(path, {"status": "ok"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
