import errno
import os

from kernel_fixtures import make_node, open_in_cgroup


def test_unfiltered_cgroup_opens_everything(scratch_cgroup, node_dir):
    null = make_node(node_dir, "c", 1, 3)
    nodriver = make_node(node_dir, "c", 240, 0)
    res = open_in_cgroup(scratch_cgroup, [(null, os.O_RDWR), (nodriver, os.O_RDONLY)])
    assert res == [0, errno.ENXIO]
