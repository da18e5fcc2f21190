"""Property tests: a checkpoint saved on N ranks and loaded for M gives numpy's slices, bit for bit.

Shapes are 0-d to 4-d with zero-length axes, dtypes are every one dinb stores (bool, every integer,
float16, bfloat16, float32, float64, with random bits: NaN payloads and negative zeros included),
layouts are drawn so that they divide the shape, and every checkpoint carries records that no
strategy names (0-d values, a tensor, strings) which must come through unchanged. The example
count is bounded for ``make test``; ``DINB_HYPOTHESIS_EXAMPLES=2000 pytest
tests/test_checkpoint_properties.py`` runs many more.
"""

import math
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinb import Layout, Strategy
from dinb.checkpoint import (
    DistributedCheckpoint,
    load_checkpoint,
    load_distributed_checkpoint,
    merge_sliced_parameter,
    rank_list_for_transform,
    save_distributed_checkpoint,
    transform_checkpoint_by_rank,
    transform_checkpoints,
    write_ckpt,
)
from dinb.formats.safetensors import np_dtype

EXAMPLES = int(os.environ.get("DINB_HYPOTHESIS_EXAMPLES", "40"))
DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "bfloat16", "float32", "float64"]
# MindSpore's string records are NUL-padded UTF-32: a trailing NUL cannot be told from padding,
# and lone surrogates have no UTF-32 form
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)


@st.composite
def layouts(draw, ndim: int) -> Layout:
    """A layout of 1-8 ranks over 1-3 device dimensions; each tensor axis split by at most one."""
    n = draw(st.integers(1, 8))
    dims, rest = [], n
    for _ in range(draw(st.integers(0, 2))):
        d = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
        dims.append(d)
        rest //= d
    dims.append(rest)
    free = list(range(len(dims)))
    tensor_map = []
    for _ in range(ndim):
        j = draw(st.sampled_from([-1, *free]))
        if j != -1:
            free.remove(j)
        tensor_map.append(j)
    return Layout(dims, tensor_map)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Random bits of ``dtype`` (bools as 0 and 1)."""
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    dt = np_dtype(dtype)
    raw = rng.integers(0, 256, math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 4))
    src, dst = draw(layouts(ndim)), draw(layouts(ndim))
    shape = tuple(math.lcm(src.parts(a), dst.parts(a)) * draw(st.integers(0, 2)) for a in range(ndim))
    extras = {
        "step": (draw(st.sampled_from(DTYPES)), ()),
        "bias": (draw(st.sampled_from(DTYPES)), (draw(st.integers(0, 3)),)),
    }
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)), src=src, dst=dst, extras=extras,
                strings={"note": draw(TEXT), "label": draw(TEXT)}, seed=draw(st.integers(0, 2**32 - 1)),
                ckpt=draw(st.booleans()))


def same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def saved(tmp, c, rng):
    """The whole arrays, and the checkpoint saved on the source layout's ranks (dinb's files, or
    MindSpore ``.ckpt`` rank files written from each rank's numpy slice)."""
    whole = {"w": random_array(rng, c["shape"], c["dtype"])}
    whole |= {k: random_array(rng, s, d) for k, (d, s) in c["extras"].items()}
    src = Strategy({"w": c["src"]})
    root = tmp / "src"
    if not c["ckpt"]:
        save_distributed_checkpoint(whole | c["strings"], src, root)
        return whole, src, root
    for r in range(c["src"].device_num):
        rank = {"w": whole["w"][c["src"].slice_of(r, c["shape"])]}
        extras = {k: whole[k] for k in c["extras"]}
        write_ckpt(root / f"rank_{r}" / f"ckpt_{r}.ckpt", rank | extras | c["strings"])
    return whole, src, root


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=cases())
def test_saved_on_n_loaded_for_m_is_numpy_slicing(tmp_path_factory, c):
    tmp = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(c["seed"])
    whole, src, root = saved(tmp, c, rng)
    dst = Strategy({"w": c["dst"]})
    m = c["dst"].device_num
    ckpt = DistributedCheckpoint(root, src)
    assert ckpt.strings == c["strings"]
    for r in range(m):
        got = load_distributed_checkpoint(None, root, dst if m > 1 else None, src, rank=r)
        want_w = whole["w"][c["dst"].slice_of(r, c["shape"])] if m > 1 else whole["w"]
        assert same(got["w"], want_w), r
        for k in c["extras"]:
            assert same(got[k], whole[k]), (r, k)
        assert {k: got[k] for k in c["strings"]} == c["strings"]
    # offline, to dinb files, then merged back to one device
    out = transform_checkpoints(root, tmp / "dst", src_strategy_file=src, dst_strategy_file=dst)
    back = load_distributed_checkpoint(None, tmp / "dst")
    for k, v in whole.items():
        assert same(back[k], v), k
    assert {k: back[k] for k in c["strings"]} == c["strings"]
    # one destination rank from only the files it needs, as MindSpore's .ckpt
    last = m - 1
    files = sorted(root.glob("rank_*/*"))
    needed = rank_list_for_transform(last, src, dst, shapes={"w": c["shape"]})
    by_rank = transform_checkpoint_by_rank(last, {r: files[r] for r in needed}, tmp / "last.ckpt", src, dst)
    one = load_checkpoint(by_rank)
    assert same(one["w"], whole["w"][c["dst"].slice_of(last, c["shape"])])
    assert {k: one[k] for k in c["strings"]} == c["strings"]
    # every rank's slice merged by its layout
    slices = [load_checkpoint(p)["w"] for p in out]
    assert same(merge_sliced_parameter(slices, c["dst"]), whole["w"])
    assert same(merge_sliced_parameter([load_checkpoint(p)["step"] for p in out]), whole["step"])
