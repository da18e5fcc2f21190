import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinb import Layout, LayoutError, common_dev_matrix


def test_design_worked_example():
    lay = Layout([2, 2], [1, 0])
    assert lay.slice_shape((96, 16)) == (48, 8)
    expect = {0: (0, 48, 0, 8), 1: (0, 48, 8, 16), 2: (48, 96, 0, 8), 3: (48, 96, 8, 16)}
    for r, (a, b, c, d) in expect.items():
        assert lay.slice_of(r, (96, 16)) == (slice(a, b), slice(c, d))


def test_rows_only_gives_replica_pairs():
    lay = Layout([2, 2], [1, -1])
    assert lay.replica_groups() == [(0, 1), (2, 3)]
    assert lay.replica_dims == (0,)
    assert lay.slice_of(1, (96, 16)) == (slice(0, 48), slice(0, 16))


def test_nested_entry_is_major_first():
    lay = Layout([2, 2], [(1, 0), -1])
    assert lay.parts(0) == 4
    assert [lay.slice_of(r, (8, 3))[0] for r in range(4)] == [slice(0, 2), slice(2, 4),
                                                               slice(4, 6), slice(6, 8)]
    lay2 = Layout([2, 2], [(0, 1), -1])
    assert [lay2.part_index(r, 0) for r in range(4)] == [0, 2, 1, 3]


def test_not_dividing_lists_sizes_that_would():
    with pytest.raises(LayoutError) as e:
        Layout([5], [0, -1]).slice_shape((96, 16), "parameter 'w'")
    msg = str(e.value)
    assert "parameter 'w'" in msg and "axis 0" in msg and "96" in msg
    assert "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96" in msg


@pytest.mark.parametrize("dm, tm, needle", [
    ([2, 2], [2, 0], "names device dimension 2"),
    ([2, 2], [0, 0], "used twice"),
    ([0, 2], [0], "positive"),
])
def test_malformed_layouts(dm, tm, needle):
    with pytest.raises(LayoutError, match=needle):
        Layout(dm, tm)


def test_wrong_rank_count_of_axes():
    with pytest.raises(LayoutError, match="3 axes"):
        Layout([2], [0, -1]).check_shape((4, 4, 4))


def test_json_and_partition_spec_round_trip():
    lay = Layout([2, 1, 4], [(2, 0), -1, 1])
    assert Layout.from_json(lay.to_json()) == lay
    assert hash(Layout.from_json(lay.to_json())) == hash(lay)
    spec = lay.partition_spec()
    assert tuple(spec) == (("d2", "d0"), None, "d1")
    back = Layout.from_partition_spec({"d2": 2, "d1": 1, "d0": 4}, spec)
    assert back == lay
    assert repr(lay) == "Layout(dev_matrix=[2, 1, 4], tensor_map=[[2, 0], -1, 1])"


def test_common_dev_matrix_and_refine():
    a, b = Layout([4], [0, -1]), Layout([2, 2], [-1, 0])
    grid = common_dev_matrix([a, b])
    assert grid == (2, 2)
    ra = a.refine(grid)
    assert ra.tensor_map[0] == (1, 0)
    for r in range(4):
        assert ra.slice_of(r, (8, 4)) == a.slice_of(r, (8, 4))
    with pytest.raises(LayoutError, match="incompatible"):
        common_dev_matrix([Layout([2, 3], [0]), Layout([3, 2], [0])])


@st.composite
def layouts_and_shapes(draw):
    n = draw(st.sampled_from([1, 2, 4, 8]))
    # factor n into a dev_matrix (with size-1 entries allowed)
    dm, left = [], n
    while left > 1 or not dm:
        f = draw(st.sampled_from([d for d in (1, 2, 4, 8) if left % d == 0]))
        dm.append(f)
        left //= f
        if len(dm) > 4:
            dm.append(left)
            break
    dm = [d for d in dm if d] or [1]
    k = len(dm)
    ndim = draw(st.integers(1, 3))
    dims = draw(st.permutations(list(range(k))))
    entries: list = []
    pos = 0
    for _ in range(ndim):
        take = draw(st.integers(0, min(2, k - pos)))
        group = tuple(dims[pos:pos + take])
        pos += take
        entries.append(-1 if not group else group[0] if len(group) == 1 else group)
    lay = Layout(dm, entries)
    shape = tuple(lay.parts(a) * draw(st.integers(1, 3)) for a in range(ndim))
    return lay, shape


@settings(max_examples=300, deadline=None)
@given(layouts_and_shapes())
def test_slices_equal_jax_devices_indices_map(devices, case):
    lay, shape = case
    devs = devices[: lay.device_num]
    index_map = lay.named_sharding(devs).devices_indices_map(shape)
    for r, d in enumerate(devs):
        ours = lay.slice_of(r, shape)
        theirs = tuple(slice(s.start or 0, shape[a] if s.stop is None else s.stop)
                       for a, s in enumerate(index_map[d]))
        assert ours == theirs, (lay, shape, r)
    # the slices of distinct replica groups tile the tensor exactly once
    covered = np.zeros(shape, dtype=int)
    for group in lay.replica_groups():
        covered[lay.slice_of(group[0], shape)] += 1
    assert covered.min() == 1 and covered.max() == 1
    assert sum(len(g) for g in lay.replica_groups()) == lay.device_num
    assert math.prod(lay.slice_shape(shape)) * len(lay.replica_groups()) == math.prod(shape)
