"""Reading collectives out of compiled HLO text: every replica-group syntax XLA prints."""

import pytest

from dinb.explore.hlo import Collective, parse_collectives, parse_replica_groups


@pytest.mark.parametrize("text, n, groups", [
    ("replica_groups={{0,1},{2,3}}, to_apply=%add", 4, ((0, 1), (2, 3))),
    ("replica_groups={}, to_apply=%add", 4, ((0, 1, 2, 3),)),
    ("channel_id=1, to_apply=%add", 2, ((0, 1),)),
    ("replica_groups=[2,2]<=[4], dimensions={0}", 4, ((0, 1), (2, 3))),
    ("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}", 8, ((0, 2, 4, 6), (1, 3, 5, 7))),
    ("replica_groups=mesh['axis_0'=1,'axis_1'=4] {'axis_1'}, use_global_device_ids=true", 4,
     ((0, 1, 2, 3),)),
    # ranks 0..3 on a 1x2x2 mesh, grouped along the middle axis
    ("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2] {'axis_1'}, x", 4, ((0, 2), (1, 3))),
    # the same mesh holding the transposed ids [0, 2, 1, 3]
    ("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, x", 4,
     ((0, 1), (2, 3))),
    ("replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_1'}, x",
     8, ((0, 1, 4, 5), (2, 3, 6, 7))),
    # a sub-axis: axis a of size 8 seen as [2, 2, 2], grouped along the middle part
    ("replica_groups=mesh['a'=8] {'a':(2)2}, x", 8, ((0, 2), (1, 3), (4, 6), (5, 7))),
])
def test_replica_group_syntaxes(text, n, groups):
    assert parse_replica_groups(text, n) == groups


def test_unknown_syntax_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unrecognised replica_groups"):
        parse_replica_groups("replica_groups=<something new>", 4)


HLO = """
ENTRY %main {
  %p = f32[128,24]{1,0} parameter(0)
  %all-reduce = f32[128,16]{1,0} all-reduce(%dot), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %all-gather.1 = bf16[8,1024]{1,0} all-gather(%x), replica_groups=[2,2]<=[4], dimensions={0}
  %rs = f32[32]{0} reduce-scatter(%y), channel_id=3, replica_groups={{0,1},{2,3}}, dimensions={0}
  %ags = (f32[4,16]{1,0}, f32[16,16]{1,0}) all-gather-start(%z), channel_id=4, replica_groups={{0,1,2,3}}
  %agd = f32[16,16]{1,0} all-gather-done(%ags)
  %cp = f32[10]{0} collective-permute(%w), channel_id=5, source_target_pairs={{0,1},{1,0},{2,2}}
}
"""


def test_collectives_are_listed_with_per_rank_bytes():
    found = parse_collectives(HLO, 4)
    assert [c.kind for c in found] == ["all-reduce", "all-gather", "reduce-scatter", "all-gather",
                                      "collective-permute"]
    ar, ag, rs, ags, cp = found
    assert (ar.bytes, ar.group_size, ar.groups) == (128 * 16 * 4, 4, ((0, 1, 2, 3),))
    assert (ag.bytes, ag.groups) == (8 * 1024 * 2, ((0, 1), (2, 3)))
    assert ags.bytes == 16 * 16 * 4  # the result half of the async pair; the -done is not counted
    assert cp.groups == ((0, 1), (1, 0), (2, 2))


def test_ring_traffic_model():
    def one(kind, nbytes, g):
        return Collective(kind, "c", (("f32", (nbytes // 4,)),), (tuple(range(g)),), nbytes)

    assert one("all-reduce", 8192, 4).bytes_sent_per_rank == 2 * 3 / 4 * 8192
    assert one("all-gather", 8192, 4).bytes_sent_per_rank == 3 / 4 * 8192
    assert one("reduce-scatter", 1024, 4).bytes_sent_per_rank == 3 * 1024
    assert one("all-reduce", 8192, 1).bytes_sent_per_rank == 0
    assert one("all-reduce", 8192, 4).seconds(1e9) == pytest.approx(12288 / 1e9)
    permute = Collective("collective-permute", "p", (("f32", (4,)),), ((0, 0), (1, 1)), 16)
    assert permute.bytes_sent_per_rank == 0  # every rank sends to itself
