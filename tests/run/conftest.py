"""A two-node Ray cluster on this machine for the tests of this folder (ray.cluster_utils.Cluster): each node has
one CPU, its own temporary directory and its own node cache, so an artifact reaches the other node only through
the engine."""

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def cluster():
    """Two nodes, `a` (the head, where the driver sits) and `b`, each pinnable by its custom resource."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from kdbench.run import node_cache

    # Unix socket paths must stay short, so not under pytest's tmp_path
    root = Path(tempfile.mkdtemp(prefix="kdray-"))
    (root / "ray").mkdir()  # Ray writes the cluster's address there
    caches = {name: root / f"cache_{name}" for name in "ab"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(root))
        nodes = {name: dict(num_cpus=1, object_store_memory=100 * 1024 ** 2, resources={f"node_{name}": 1},
                            temp_dir=str(root / f"node_{name}"),
                            env_vars={node_cache.CACHE_ENV: str(caches[name])}) for name in "ab"}
        c = Cluster(initialize_head=True, head_node_args=nodes["a"])
        c.add_node(**nodes["b"])
        c.wait_for_nodes()
        c.connect()
        try:
            yield caches
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(root, ignore_errors=True)
