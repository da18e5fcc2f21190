"""The slice file: everything rank r needs, in one safetensors file (``{model}{r}.dinb``).

It is the analogue of MindSpore's ``Matmul0.mindir``. Format (plain safetensors, see
:mod:`dinb.formats.safetensors`; any safetensors reader opens it and loading never runs code):

* tensor ``param/<name>``: rank r's slice of parameter ``<name>`` under its layout;
* tensor ``program``: uint8 bytes of the serialized ``jax.export`` SPMD program (identical in
  every rank's file; in a pipelined export, in every file of one stage, and the program for
  the whole batch, while ``program/<M>`` runs micro-batches of ``1/M`` of it);
* header ``__metadata__["dinb"]``: JSON with ``format``, ``format_version``, ``dinb_version``,
  ``model``, ``rank``, ``world_size``, ``export_id`` (shared by the files of one export),
  ``platforms``, ``inputs``/``outputs`` (name, shape, dtype, layout), ``params`` (full shape,
  dtype, layout, the slice bounds and a checksum per tensor) and ``program`` (checksum, bytes);
  in a pipelined export also ``pipeline`` (``stages``, this rank's ``stage``, ``stage_ranks``,
  its ``layers``, the ``micro_batches`` it has programs for, and the values it ``receives``
  from the previous stage and ``sends`` to the next) and ``programs`` (checksum and bytes of each
  ``program/<M>``). Layouts then span one stage's ranks, and a rank's slice is that of rank
  ``rank % stage_ranks``. A checksum field names its algorithm: ``xxh3_64`` (format version 2,
  16 hex digits of XXH3-64, 29 GB/s) or ``sha256`` (version 1 files, 1.8 GB/s), both read;
* in a decoder's export (format version 4) also ``generation``: the sequence ``slots``,
  ``max_len``, the prompt ``buckets``, the attention ``windows``, the ``decode_steps`` per call,
  the ``prefill_shapes`` (rows, bucket), the end tokens per slot (``stops``), the ``kernels``
  each platform's prefill uses, the names of its ``programs`` and the KV ``cache`` (name, shape,
  dtype, layout). ``program`` is then the decode step with its logits, and ``program/<name>``
  each generation program (see :mod:`dinb.export.decode_programs`).
* in an export with batch buckets also ``batch_buckets`` (the batch sizes it has programs for,
  ascending, the largest being the inputs' own) and ``program/batch_<b>`` for each smaller
  one; ``program`` runs the largest (see :mod:`dinb.sharding.batch_buckets`).

Reading checks the header field by field before any tensor is read (a damaged file is a
:class:`SliceFileError` naming the file and the field), then reads the tensors with one open.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinb.errors import DinbError, SliceFileError
from dinb.formats import safetensors as st
from dinb.formats.untrusted import Fields
from dinb.sharding.layout import MAX_DEVICES, Layout
from dinb.sharding.pipeline import MAX_MICRO_BATCHES

FORMAT = "dinb-slice"
FORMAT_VERSION = 2
GENERATION_FORMAT_VERSION = 4  # files with a decoder's programs: an older reader refuses them
PAGED_FORMAT_VERSION = 5  # ... whose KV cache is a pool of blocks (generation.paged)
#: the checksum field of each format version (the field's name is its algorithm)
DIGEST_FIELD = {1: "sha256", 2: "xxh3_64", 4: "xxh3_64", 5: "xxh3_64"}
#: the generation programs' names (see dinb.export.decode_programs)
GENERATION_PROGRAM = re.compile(r"(decode_\d+_w\d+(_sample)?|prefill_\d+x\d+(_w\d+)?(@cuda)?)")
SUFFIX = ".dinb"
PROGRAM_KEY = "program"
PARAM_PREFIX = "param/"


def slice_file_name(model: str, rank: int) -> str:
    """``matmul0.dinb``, ``matmul1.dinb``, ...: MindSpore Lite's ``Matmul0.mindir`` naming; a
    name that ends in a digit takes a dash before the rank (``qwen2-0.dinb``)."""
    return f"{model}{'-' if model[-1:].isdigit() else ''}{rank}{SUFFIX}"


SLICE_FILE_NAME = re.compile(rf"(?:(.*\d)-|(.*\D))(\d+){re.escape(SUFFIX)}")


def parse_slice_file_name(name: str) -> tuple[str, int] | None:
    """``(model, rank)`` of a slice file's name (see :func:`slice_file_name`), or None."""
    m = SLICE_FILE_NAME.fullmatch(name)
    return (m.group(1) or m.group(2), int(m.group(3))) if m else None


def digest(array: np.ndarray, algorithm: str = DIGEST_FIELD[FORMAT_VERSION]) -> str:
    """Hex checksum of ``array``'s bytes: ``xxh3_64`` (written) or ``sha256`` (version 1 files)."""
    data = np.ascontiguousarray(array).view(np.uint8).data
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def _digest_of(meta: dict[str, Any]) -> str:
    return DIGEST_FIELD[meta["format_version"]]


@dataclass(frozen=True)
class TensorMeta:
    """Name, full shape, dtype and layout of one input, output or parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: Layout

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorMeta:
        return cls(d["name"], tuple(d["shape"]), d["dtype"], Layout.from_json(d["layout"]))


@dataclass(frozen=True)
class SliceFile:
    """A slice file opened and verified: metadata, this rank's weight slices and the program."""

    path: Path
    meta: dict[str, Any]
    params: dict[str, np.ndarray]
    program: bytes
    extra_programs: dict[str, bytes] | None = None  # program/<M> (pipelines), program/prefill_<P>

    def program_for(self, micro_batches: int | str) -> bytes:
        """The program for ``micro_batches`` micro-batches (1: the whole batch), or the named one
        (``"prefill_16"``)."""
        if micro_batches == 1:
            return self.program
        return (self.extra_programs or {})[str(micro_batches)]

    @property
    def batch_buckets(self) -> list[int]:
        """The batch sizes this export has programs for, ascending ([] without buckets)."""
        return list(self.meta.get("batch_buckets", []))

    @property
    def generation(self) -> dict[str, Any] | None:
        """A decoder's cache and programs (see the module docstring), or None."""
        return self.meta.get("generation")

    @property
    def rank(self) -> int:
        return int(self.meta["rank"])

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def export_id(self) -> str:
        return str(self.meta["export_id"])

    @property
    def pipeline(self) -> dict[str, Any] | None:
        """The stage this file belongs to (see the module docstring), or None without stages."""
        return self.meta.get("pipeline")

    @property
    def inputs(self) -> list[TensorMeta]:
        return [TensorMeta.from_json(d) for d in self.meta["inputs"]]

    @property
    def outputs(self) -> list[TensorMeta]:
        return [TensorMeta.from_json(d) for d in self.meta["outputs"]]

    def param_meta(self) -> dict[str, TensorMeta]:
        return {n: TensorMeta(n, tuple(d["shape"]), d["dtype"], Layout.from_json(d["layout"]))
                for n, d in self.meta["params"].items()}


def write_slice_file(path: Path, meta: dict[str, Any], params: dict[str, np.ndarray],
                     program: bytes | dict[Any, bytes]) -> Path:
    """Write one rank's slice file; checksums are computed here and stored in ``meta``.
    ``program`` is the program, or ``{micro-batch count or name: program}`` (1 included)."""
    programs = program if isinstance(program, dict) else {1: program}
    version = FORMAT_VERSION
    if "generation" in meta:
        version = PAGED_FORMAT_VERSION if "paged" in meta["generation"] else GENERATION_FORMAT_VERSION
    meta = dict(meta, format=FORMAT, format_version=version)
    tensors = {PARAM_PREFIX + n: a for n, a in params.items()}
    field = DIGEST_FIELD[FORMAT_VERSION]
    meta["params"] = {n: dict(meta["params"][n], **{field: digest(a)}) for n, a in params.items()}
    for m, body in sorted(programs.items(), key=lambda kv: str(kv[0])):
        prog = np.frombuffer(body, dtype=np.uint8)
        record = {field: digest(prog), "nbytes": len(body)}
        if m == 1:
            meta["program"] = record
        else:
            meta.setdefault("programs", {})[str(m)] = record
        tensors[_program_key(m)] = prog
    return st.write_file(path, tensors, {"dinb": json.dumps(meta)})


def _program_key(micro_batches: int | str) -> str:
    return PROGRAM_KEY if micro_batches == 1 else f"{PROGRAM_KEY}/{micro_batches}"


def _extra_programs(meta: dict[str, Any]) -> list[int | str]:
    """The programs a file holds besides ``program``: micro-batch counts or prefill names."""
    if "generation" in meta:
        return list(meta["generation"]["programs"])
    if "batch_buckets" in meta:
        return [f"batch_{b}" for b in meta["batch_buckets"][:-1]]
    return [m for m in meta.get("pipeline", {}).get("micro_batches", [1]) if m != 1]


def _header(path: Path) -> tuple[st.Header, dict[str, Any]]:
    """The file's safetensors header and its checked dinb metadata."""
    header = st.read_header(path, SliceFileError, "slice file")
    if "dinb" not in header.metadata:
        raise SliceFileError(f"{path}: a safetensors file without dinb metadata; not a slice file")
    check = Fields(SliceFileError, str(path))
    meta = check.obj(check.json(header.metadata["dinb"], "the dinb metadata"), "the dinb metadata")
    version = meta.get("format_version")
    if version == 3 and meta.get("format") == FORMAT:
        raise SliceFileError(
            f"{path}: a decoder export of an earlier dinb (format version 3, before tokens were picked on "
            "the device); export it again with this dinb (python -m dinb export --model llama ...)")
    if meta.get("format") != FORMAT or type(version) is not int or version not in DIGEST_FIELD:
        raise SliceFileError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this "
            f"dinb reads {FORMAT!r} versions {sorted(DIGEST_FIELD)}. Re-export with this dinb version."
        )
    _check_meta(check, meta, header)
    return header, meta


def _check_meta(check: Fields, meta: dict[str, Any], header: st.Header) -> None:
    """Every field a reader of the metadata uses, checked against the file's own tensors."""
    for key in ("model", "export_id"):
        check.get(meta, key, "metadata", str)
    world = check.int(check.get(meta, "world_size", "metadata", int), "world_size", 1)
    rank = check.int(check.get(meta, "rank", "metadata", int), "rank", 0)
    if rank >= world or world > MAX_DEVICES:
        check.fail(f"rank {rank} of a world of {world} ranks; the file is damaged")
    config = check.obj(meta.get("model_config", {}), "model_config")
    if "cache_blocks" in config and "cache" not in config:  # a decoder exported before caches were named
        config["cache"] = "slots" if config["cache_blocks"] is None else "paged"
    for i, p in enumerate(check.get(meta, "platforms", "metadata", list, [])):
        check.check(p, f"platforms[{i}]", str)
    span = _check_pipeline(check, meta, rank, world) if "pipeline" in meta else world
    local = rank % span
    roles = [("inputs", meta), ("outputs", meta)]
    if "pipeline" in meta:
        roles += [("receives", meta["pipeline"]), ("sends", meta["pipeline"])]
    for role, holder in roles:
        for i, d in enumerate(check.get(holder, role, "metadata", list)):
            where = f"{role}[{i}]"
            d = check.obj(d, where)
            check.get(d, "name", where, str)
            _tensor_layout(check, d, where, span).check_shape(d["shape"], where)
    params = check.obj(check.get(meta, "params", "metadata", dict), "params")
    for name, d in params.items():
        where = f"parameter {name!r} (rank {rank})"
        d = check.obj(d, where)
        layout = _tensor_layout(check, d, where, span)
        check.get(d, _digest_of(meta), where, str)
        try:
            want = [[sl.start, sl.stop] for sl in layout.slice_of(local, d["shape"], name)]
        except DinbError as e:
            check.fail(f"{where}: {e}")
        if check.get(d, "slice", where, list) != want:
            check.fail(f"{where}: slice {d['slice']} is not what its layout gives rank {rank} ({want})")
        entry = header.entries.get(PARAM_PREFIX + name)
        shape = tuple(b - a for a, b in want)
        if entry is None or entry.shape != shape or str(entry.dtype) != d["dtype"]:
            found = "no tensor" if entry is None else f"{entry.dtype}{list(entry.shape)}"
            check.fail(f"{where}: the file holds {found} for it, the metadata says {d['dtype']}{list(shape)}")
    if "generation" in meta:
        _check_generation(check, meta, span)
    if "batch_buckets" in meta:
        _check_batch_buckets(check, meta)
    records: dict[int | str, Any] = {1: check.obj(check.get(meta, "program", "metadata", dict), "program")}
    for m in _extra_programs(meta):
        extra = check.obj(check.get(meta, "programs", "metadata", dict), "programs")
        records[m] = check.obj(check.get(extra, str(m), "programs", dict), f"programs.{m}")
    for m, program in records.items():
        key = _program_key(m)
        check.get(program, _digest_of(meta), key, str)
        nbytes = check.int(check.get(program, "nbytes", key, int), f"{key}.nbytes", 0)
        entry = header.entries.get(key)
        if entry is None or entry.shape != (nbytes,) or entry.dtype != np.uint8:
            check.fail(f"the {key} tensor is missing or is not {nbytes} bytes of uint8")


def _check_generation(check: Fields, meta: dict[str, Any], world: int) -> None:
    """The ``generation`` record: sizes, buckets, windows, programs and the cache's tensor."""
    gen = check.obj(meta["generation"], "generation")
    for key in ("slots", "max_len", "stops"):
        check.int(check.get(gen, key, "generation", int), f"generation.{key}", 1)
    for key in ("buckets", "windows", "decode_steps"):
        values = check.get(gen, key, "generation", list)
        for i, b in enumerate(values):
            check.int(b, f"generation.{key}[{i}]", 1)
            if key != "decode_steps" and b > gen["max_len"]:
                check.fail(f"generation.{key}[{i}] = {b} is longer than max_len {gen['max_len']}")
        if not values or len(set(values)) != len(values):
            check.fail(f"generation.{key} {values} must list distinct numbers")
    for i, name in enumerate(check.get(gen, "programs", "generation", list)):
        if not isinstance(name, str) or not GENERATION_PROGRAM.fullmatch(name):
            check.fail(f"generation.programs[{i}] {name!r} is not a generation program's name")
    check.obj(check.get(gen, "kernels", "generation", dict), "generation.kernels")
    if "paged" in gen:
        _check_paged(check, gen)
    cache = check.obj(check.get(gen, "cache", "generation", dict), "generation.cache")
    check.get(cache, "name", "generation.cache", str)
    _tensor_layout(check, cache, "generation.cache", world).check_shape(cache["shape"], "generation.cache")


def _check_paged(check: Fields, gen: dict[str, Any]) -> None:
    """``generation.paged``: the pool's blocks, their size, a slot's table width, the prefix
    programs' (bucket, window) pairs."""
    paged = check.obj(gen["paged"], "generation.paged")
    for key in ("blocks", "block_size", "table_width"):
        check.int(check.get(paged, key, "generation.paged", int), f"generation.paged.{key}", 1)
    if paged["table_width"] * paged["block_size"] < gen["max_len"] or paged["blocks"] < paged["table_width"]:
        check.fail(f"generation.paged: {paged['blocks']} blocks, tables of {paged['table_width']} blocks of "
                   f"{paged['block_size']} do not hold a sequence of max_len {gen['max_len']}; the file is "
                   "damaged")
    for i, pair in enumerate(check.get(paged, "prefix_shapes", "generation.paged", list)):
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) is int and 1 <= v <= gen["max_len"]
                                                                  for v in pair)):
            check.fail(f"generation.paged.prefix_shapes[{i}] {pair!r}: give [bucket, window] within max_len")


def _check_batch_buckets(check: Fields, meta: dict[str, Any]) -> None:
    """``batch_buckets``: ascending batch sizes, the largest the inputs' own first axis."""
    if "pipeline" in meta or "generation" in meta:
        check.fail("batch_buckets in a pipelined or a decoder's export; they are for one-stage exports")
    buckets = check.get(meta, "batch_buckets", "metadata", list)
    for i, b in enumerate(buckets):
        check.int(b, f"batch_buckets[{i}]", 1)
    top = [d["shape"][0] if d["shape"] else None for d in meta["inputs"]]
    if not buckets or buckets != sorted(set(buckets)) or any(t != buckets[-1] for t in top):
        check.fail(f"batch_buckets {buckets} must ascend to the inputs' batch {top}")


def _check_pipeline(check: Fields, meta: dict[str, Any], rank: int, world: int) -> int:
    """The ``pipeline`` record, checked against the rank and world; returns the stage's rank count."""
    pipe = check.obj(meta["pipeline"], "pipeline")
    stages = check.int(check.get(pipe, "stages", "pipeline", int), "pipeline.stages", 1)
    span = check.int(check.get(pipe, "stage_ranks", "pipeline", int), "pipeline.stage_ranks", 1)
    stage = check.int(check.get(pipe, "stage", "pipeline", int), "pipeline.stage", 0)
    if stages * span != world or stage != rank // span:
        check.fail(f"pipeline: {stages} stages of {span} ranks with rank {rank} in stage {stage} do not "
                   f"fit a world of {world} ranks; the file is damaged")
    layers = check.get(pipe, "layers", "pipeline", list)
    if len(layers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers) \
            or not 0 <= layers[0] < layers[1]:
        check.fail(f"pipeline.layers {layers!r} is not a [start, stop) range of layers")
    counts = check.get(pipe, "micro_batches", "pipeline", list)
    for i, m in enumerate(counts):
        check.int(m, f"pipeline.micro_batches[{i}]", 1)
        if m > MAX_MICRO_BATCHES:
            check.fail(f"pipeline.micro_batches[{i}] = {m} is over {MAX_MICRO_BATCHES}")
    if 1 not in counts or len(set(counts)) != len(counts):
        check.fail(f"pipeline.micro_batches {counts} must list distinct counts, 1 among them")
    return span


def _tensor_layout(check: Fields, d: dict[str, Any], where: str, world: int) -> Layout:
    """Check a tensor record's ``shape``, ``dtype`` and ``layout`` (over ``world`` ranks)."""
    check.shape(check.get(d, "shape", where, list), f"{where}.shape")
    dtype = check.get(d, "dtype", where, str)
    if dtype not in st.DTYPES:
        check.fail(f"{where}.dtype {dtype!r} is not one of {sorted(st.DTYPES)}")
    lay = check.obj(check.get(d, "layout", where, dict), f"{where}.layout")
    try:
        layout = Layout(check.get(lay, "dev_matrix", f"{where}.layout", list),
                        check.get(lay, "tensor_map", f"{where}.layout", list))
    except DinbError as e:
        check.fail(f"{where}.layout: {e}")
    if layout.device_num != world:
        check.fail(f"{where}.layout spans {layout.device_num} ranks, the export {world}")
    return layout


def read_meta(path: str | Path) -> dict[str, Any]:
    """Only the header of a slice file (cheap: no tensor bytes are read), checked."""
    return _header(Path(path))[1]


def _read(path: Path, params: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checked metadata and the program(s) (plus, with ``params``, every parameter slice)."""
    header, meta = _header(path)
    names = [PARAM_PREFIX + n for n in meta["params"]] if params else []
    names += [_program_key(m) for m in [1, *_extra_programs(meta)]]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SliceFileError(f"slice file {path} cannot be read ({e.strerror or e})") from None
    try:
        arrays = {n: st.read_tensor(fd, header.entries[n], path, SliceFileError) for n in names}
    finally:
        os.close(fd)
    return meta, arrays


def read_program(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """The header and the serialized program of a slice file, without its parameters."""
    path = Path(path)
    meta, arrays = _read(path, params=False)
    program = arrays[PROGRAM_KEY]
    field = _digest_of(meta)
    if digest(program, field) != meta["program"][field]:
        raise SliceFileError(f"{path}: the program fails its checksum; the file is corrupted")
    return meta, program.tobytes()


def read_slice_file(path: str | Path, verify: bool = True) -> SliceFile:
    """Open one rank's slice file (once), read its tensors and check every checksum."""
    path = Path(path)
    meta, arrays = _read(path, params=True)
    rank = meta["rank"]
    params = {n[len(PARAM_PREFIX):]: a for n, a in arrays.items() if n.startswith(PARAM_PREFIX)}
    programs = {m: arrays[_program_key(m)] for m in [1, *_extra_programs(meta)]}
    if verify:
        field = _digest_of(meta)
        for name, arr in params.items():
            if digest(arr, field) != meta["params"][name][field]:
                raise SliceFileError(
                    f"{path} (rank {rank}): parameter {name!r} fails its checksum; the file is "
                    "corrupted. Export the model again or restore the file."
                )
        for m, program in programs.items():
            record = meta["program"] if m == 1 else meta["programs"][str(m)]
            if digest(program, field) != record[field]:
                raise SliceFileError(
                    f"{path} (rank {rank}): the {_program_key(m)} tensor fails its checksum; the file "
                    "is corrupted. Export the model again or restore the file."
                )
    extra = {str(m): p.tobytes() for m, p in programs.items() if m != 1}
    return SliceFile(path, meta, params, programs[1].tobytes(), extra or None)


def find_slice_files(model_dir: str | Path) -> dict[int, Path]:
    """The slice files of a directory by rank, checked to be one export with ranks 0..n-1."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SliceFileError(f"model directory {model_dir} does not exist")
    files = sorted(model_dir.glob(f"*{SUFFIX}"))
    if not files:
        raise SliceFileError(
            f"{model_dir} holds no slice files (*{SUFFIX}); export a model there first "
            "(python -m dinb export --out DIR)"
        )
    by_rank: dict[int, Path] = {}
    models = set()
    for p in files:
        parsed = parse_slice_file_name(p.name)
        if parsed is None:
            raise SliceFileError(f"{p}: slice file names end in <rank>{SUFFIX}")
        models.add(parsed[0])
        by_rank[parsed[1]] = p
    if len(models) > 1:
        raise SliceFileError(
            f"{model_dir} mixes slice files of several models {sorted(models)}; keep one export "
            "per directory"
        )
    n = int(read_meta(by_rank[min(by_rank)])["world_size"])
    extra = [r for r in by_rank if r >= n]
    if extra:
        raise SliceFileError(
            f"{model_dir}: the export is for {n} ranks but files for ranks {extra} are there too; "
            "they belong to another export - remove them or export into an empty directory"
        )
    missing = [r for r in range(n) if r not in by_rank]
    if missing:
        raise SliceFileError(
            f"{model_dir}: the export is for {n} ranks but the slice files of ranks {missing} are "
            f"missing (found ranks {sorted(by_rank)}); export again or restore them"
        )
    return by_rank

