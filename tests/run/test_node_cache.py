"""Artifacts packed on one node and placed on another's cache (no Ray needed)."""

import threading
from pathlib import Path

import pytest

from kdbench.run import node_cache


def make_artifact(cache: Path, rel: str) -> Path:
    folder = cache / rel
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 32}')
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    return folder


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("via_storage", [False, True])
def test_pack_then_place_gives_the_same_tree_on_another_cache(tmp_path, via_storage):
    a, b = tmp_path / "node_a", tmp_path / "node_b"
    made = make_artifact(a, "teachers/abc123")
    storage = (tmp_path / "store").as_uri() if via_storage else None
    source, packed = node_cache.pack(a, "teachers/abc123", storage)
    assert packed.how == ("uploaded" if via_storage else "packed") and packed.bytes > 10_000
    placed = node_cache.place(b, "teachers/abc123", lambda: source)
    assert placed.how == "fetched" and placed.bytes == packed.bytes
    assert tree(b / "teachers/abc123") == tree(made)
    assert [p.name for p in (b / "teachers").iterdir()] == ["abc123"]  # no temporary left beside it
    if via_storage:
        assert (tmp_path / "store" / "teachers" / "abc123.tar").is_file()
        again, kept = node_cache.pack(a, "teachers/abc123", storage)  # the path names the content: not re-sent
        assert kept.how == "kept" and again == source


def test_a_node_that_holds_the_path_never_fetches(tmp_path):
    make_artifact(tmp_path, "students/s0")

    def fetch():
        raise AssertionError("fetched although the node holds it")

    assert node_cache.place(tmp_path, "students/s0", fetch).how == "hit"


def test_nothing_made_is_absent_on_both_sides(tmp_path):
    source, packed = node_cache.pack(tmp_path, "students/never", None)
    assert source is None and packed.how == "absent"
    assert node_cache.place(tmp_path / "b", "students/never", lambda: source).how == "absent"
    assert not (tmp_path / "b" / "students" / "never").exists()


def test_two_workers_placing_one_artifact_at_once_leave_one_whole_copy(tmp_path):
    made = make_artifact(tmp_path / "a", "teachers/t")
    source, _ = node_cache.pack(tmp_path / "a", "teachers/t")
    barrier = threading.Barrier(2)

    def fetch():
        barrier.wait()  # both have seen the path missing before either renames it into place
        return source

    threads = [threading.Thread(target=node_cache.place, args=(tmp_path / "b", "teachers/t", fetch)) for _ in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tree(tmp_path / "b" / "teachers" / "t") == tree(made)
    assert [p.name for p in (tmp_path / "b" / "teachers").iterdir()] == ["t"]


@pytest.mark.parametrize("rel", ["/etc/passwd", "../up", "a/../../b", ""])
def test_paths_outside_the_cache_are_refused(tmp_path, rel):
    with pytest.raises(ValueError, match="relative"):
        node_cache.place(tmp_path, rel, lambda: None)


def test_the_node_cache_follows_its_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "local-ssd"))
    assert node_cache.node_cache_dir() == tmp_path / "local-ssd" and (tmp_path / "local-ssd").is_dir()
