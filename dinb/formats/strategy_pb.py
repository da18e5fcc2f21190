"""MindSpore's protobuf strategy file, converted to and from the JSON strategy schema.

A strategy file that does not end in ``.json`` is a serialized ``ParallelStrategyMap`` (package
``mindspore.straspb``)::

    ParallelStrategyMap { uint32 current_stage = 1; repeated ParallelLayoutItem parallel_layout_item = 3; }
    ParallelLayoutItem  { string param_name = 1; ParallelLayouts parallel_layouts = 2; }
    ParallelLayouts     { repeated DevMatrix dev_matrix = 1; repeated TensorMap tensor_map = 2;
                          repeated ParamSplitShape param_split_shape = 3;
                          repeated IndicesOffset indices_offset = 4; int32 field = 5;
                          int32 opt_weight_shard_step = 6; int32 opt_weight_shard_size = 7; }

``DevMatrix``, ``TensorMap``, ``ParamSplitShape`` and ``IndicesOffset`` each hold ``repeated
int64 dim = 1``. A nested tensor_map is written as one ``TensorMap`` per tensor axis. The
protobuf form carries no tensor shape.

This module knows nothing of :class:`dinb.Strategy`: :func:`parse` returns the JSON schema's
dict (``{"current_stage": .., "parallel_layout_item": {name: {"dev_matrix": .., ...}}}``) and
:func:`serialize` takes one, so the strategy layer converts both forms through the same code.
"""

from __future__ import annotations

from typing import Any

from dinb.errors import StrategyError
from dinb.formats import protobuf as pb

MAX_ITEMS = 1 << 16  # dims per list; a file claiming more is damaged


def parse(data: bytes, source: str = "strategy") -> dict[str, Any]:
    """The strategy in ``data`` as the JSON schema's dict; errors name ``source`` and the record."""
    stage = 0
    items: dict[str, Any] = {}
    try:
        for number, wire, value in pb.fields(data):
            if number == 1:
                pb.expect(wire, pb.VARINT, "current_stage")
                stage = value
            elif number == 3:
                pb.expect(wire, pb.LEN, f"parallel_layout_item {len(items)}")
                name, item = _layout_item(data, value, len(items))
                items[name] = item
    except pb.WireError as e:
        raise StrategyError(
            f"{source} is neither a JSON strategy (name it *.json) nor a protobuf ParallelStrategyMap ({e})"
        ) from None
    if not items:
        raise StrategyError(f"{source}: the strategy has no parallel_layout_item entries")
    return {"current_stage": stage, "parallel_layout_item": items}


def _layout_item(data: bytes, span: tuple[int, int], index: int) -> tuple[str, dict[str, Any]]:
    name, layouts = None, None
    for number, wire, value in pb.fields(data, *span):
        if number == 1:
            pb.expect(wire, pb.LEN, f"param_name of parallel_layout_item {index}")
            name = pb.text(data, value, f"param_name of parallel_layout_item {index}")
        elif number == 2:
            pb.expect(wire, pb.LEN, f"parallel_layouts of parallel_layout_item {index}")
            layouts = value
    where = f"parameter {name!r}" if name is not None else f"parallel_layout_item {index}"
    if name is None or layouts is None:
        raise pb.WireError(f"{where} lacks its param_name or its parallel_layouts")
    lists: dict[int, list[list[int]]] = {1: [], 2: [], 3: [], 4: []}
    ints = {5: 0, 6: 0, 7: 0}
    for number, wire, value in pb.fields(data, *layouts):
        if number in lists:
            pb.expect(wire, pb.LEN, f"field {number} of {where}")
            dims: list[int] = []
            for n2, w2, v2 in pb.fields(data, *value):
                if n2 == 1:
                    dims += pb.packed_or_single(data, w2, v2, signed=True)
                    if len(dims) > MAX_ITEMS:
                        raise pb.WireError(f"{where}: a list of more than {MAX_ITEMS} dims")
            lists[number].append(dims)
        elif number in ints:
            pb.expect(wire, pb.VARINT, f"field {number} of {where}")
            ints[number] = pb.packed_or_single(data, wire, value, signed=True)[0]
    if not lists[1] or not lists[2]:
        raise pb.WireError(f"{where} lacks its dev_matrix or tensor_map")
    maps = lists[2]
    if len(maps) > 1:  # nested form: one TensorMap per tensor axis
        if not all(maps):
            raise pb.WireError(f"{where}: an empty TensorMap in a nested tensor_map")
        tensor_map: list[Any] = [m[0] if len(m) == 1 else m for m in maps]
    else:
        tensor_map = maps[0]
    if any(any(x) for x in lists[3]) or any(any(x) for x in lists[4]):
        raise StrategyError(
            f"{where} has a non-uniform split (param_split_shape / indices_offset); dinb handles even "
            "splits only"
        )
    return name, {"dev_matrix": lists[1][0], "tensor_map": tensor_map, "field": ints[5],
                  "opt_weight_shard_step": ints[6], "opt_weight_shard_size": ints[7]}


def serialize(strategy_json: dict[str, Any]) -> bytes:
    """The protobuf ``ParallelStrategyMap`` of a strategy in the JSON schema (as MindSpore writes it)."""
    out = pb.int_field(1, int(strategy_json.get("current_stage", 0)))
    for name, item in strategy_json["parallel_layout_item"].items():
        body = pb.len_field(1, b"".join(pb.int_field(1, d) for d in item["dev_matrix"]))
        tmap = item["tensor_map"]
        if any(isinstance(e, list) for e in tmap):
            for e in tmap:
                dims = e if isinstance(e, list) else [e]
                body += pb.len_field(2, b"".join(pb.int_field(1, d) for d in dims))
        else:
            body += pb.len_field(2, b"".join(pb.int_field(1, int(e)) for e in tmap))
        body += pb.len_field(3, b"") + pb.len_field(4, b"")
        body += pb.int_field(5, item.get("field", 0)) + pb.int_field(6, item.get("opt_weight_shard_step", 0))
        body += pb.int_field(7, item.get("opt_weight_shard_size", 0))
        out += pb.len_field(3, pb.len_field(1, name.encode()) + pb.len_field(2, body))
    return out
