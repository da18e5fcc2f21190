"""A decoder's generation programs as each rank's own steps, the collectives by MPI.

On CPU ranks that ``mpiexec`` started, the SPMD decode program's collectives go over gloo: 2
all-reduces a layer and a gather a step, each costing more than the step's arithmetic for a
model a CPU runs. Here each rank compiles :mod:`dinb.models.decode_loop`'s programs itself over
its own slices (:class:`~dinb.models.llama_rank.RankModel`), each all-reduce and the vocabulary's
all-gather a host callback (``jax.pure_callback``) into MPI::

    x = embed(tokens)
    per layer:  x += allreduce(attention_r(x));  x += allreduce(mlp_r(x))     MPI from inside
    logits = allgather(head_r(x))                                            the program

So a call of ``k`` decode steps is still one program on each rank (the loop on the device, the
tokens picked there), and the collectives come in the same order on every rank, each one
depending on the one before. The programs take and return what the exported ones do, so
:class:`~dinb.runtime.runners.decoder.DecoderRunner` drives both alike; ``megatron`` and
``replicated`` run here, ``batch`` stays on the SPMD program.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from dinb.errors import ProviderError, StrategyError
from dinb.export.slicefile import SliceFile, TensorMeta
from dinb.job import ranks
from dinb.models.decode_loop import decode_program, prefill_program
from dinb.models.llama_rank import RankModel
from dinb.models.rank_program import AllGather, AllReduce
from dinb.runtime.config import RuntimeConfig
from dinb.runtime.runners.rank_steps import MpiCollectives, strategy_of

DECODE = re.compile(r"decode_(\d+)_w(\d+)(_sample)?")
PREFILL = re.compile(r"prefill_(\d+)x(\d+)(?:_w(\d+))?(@cuda)?")
STRATEGIES = ("megatron", "replicated")


def decoder_model(first: SliceFile) -> tuple[Any, str | None]:
    """The export's decoder and the name of its strategy (None: not a named one)."""
    from dinb.models import get_model

    model = get_model(first.model, **first.meta.get("model_config", {}))
    pipe = first.pipeline
    if pipe is None:
        return model, model.strategy_name_of(strategy_of(first))
    stages = int(pipe["stages"])  # a stage's file: its parameters' layouts under the staged strategy
    for name in model.strategy_names:
        try:
            known = model.strategy(stages * int(pipe["stage_ranks"]), name, pipeline_stages=stages)
        except StrategyError:
            continue
        if all(n in known and known[n] == m.layout for n, m in first.param_meta().items()):
            return model, name
    return model, None


def mpi_decoder_applies(files: dict[int, SliceFile], job: ranks.Job, config: RuntimeConfig) -> bool:
    """Whether a decoder's CPU ranks of several processes run :class:`MpiDecoderPrograms`
    (config ``collectives``: ``auto`` or ``mpi``; the ranks must be MPI's processes, one rank
    each, under ``megatron`` or ``replicated``). Every rank must choose alike: they compare."""
    wanted = config.collectives
    if job.process_count == 1 or job.target != "cpu" or wanted == "gloo":
        return False
    world = ranks.mpi_world()
    reason = None
    if world is None or world[1] != job.process_count or len(job.local_ranks) != 1:
        reason = "the ranks are not MPI's processes (mpiexec or notebook engines='mpi')"
    else:
        _, name = decoder_model(next(iter(files.values())))
        if name not in STRATEGIES:
            reason = f"a decoder's per-rank steps run {list(STRATEGIES)}; this export's strategy is {name!r}"
    if reason and wanted == "mpi":
        raise ProviderError(f"collectives = mpi: {reason}; use collectives = gloo or auto")
    return all(c == "mpi" for c in job.allgather("collectives", "gloo" if reason else "mpi"))


class MpiDecoderPrograms:
    """This rank's generation programs (see the module docstring), by the exported names."""

    def __init__(self, file: SliceFile, rank: int, world_size: int, device: Any, comm: Any = None):
        """``rank`` of ``world_size``: of the job, or of its pipeline stage (``comm``: the stage's
        communicator)."""
        import jax

        model, name = decoder_model(file)
        tp = world_size if name == "megatron" else 1
        self.comm = MpiCollectives(world_size, "a decoder's per-rank steps", comm) if tp > 1 else None
        self.model = RankModel(model, tp, self._all_reduce, self._all_gather)
        self.device = device
        self.params = {n: jax.device_put(v, device) for n, v in file.params.items()}
        cache = TensorMeta.from_json(file.generation["cache"])
        self.cache_shape = tuple(cache.layout.slice_shape(cache.shape, cache.name))
        self.cache_dtype = cache.dtype
        self.vocab_order = None  # the ranks in the order of their vocabulary rows
        if self.model.vocab_split and "lm_head.weight" in file.param_meta():  # (the last stage's)
            head = "lm_head.weight"
            meta = file.param_meta()[head]
            self.vocab_order = np.argsort([meta.layout.slice_of(r, meta.shape, head)[0].start
                                           for r in range(world_size)])
        self.programs: dict[str, Callable[..., tuple[Any, ...]]] = {}

    # ---- the collectives, called back from inside the programs ---------------------------------------
    def _all_reduce(self, partial: Any) -> Any:
        import jax

        return jax.pure_callback(self._host_sum, jax.ShapeDtypeStruct(partial.shape, partial.dtype), partial)

    def _host_sum(self, partial: np.ndarray) -> np.ndarray:
        return self.comm.collect(AllReduce(), np.ascontiguousarray(partial))  # type: ignore[union-attr]

    def _all_gather(self, part: Any) -> Any:
        import jax

        shape = (*part.shape[:-1], part.shape[-1] * len(self.vocab_order))  # type: ignore[arg-type]
        return jax.pure_callback(self._host_gather, jax.ShapeDtypeStruct(shape, part.dtype), part)

    def _host_gather(self, part: np.ndarray) -> np.ndarray:
        parts = self.comm.collect(AllGather(axis=0), np.ascontiguousarray(part)[None])  # type: ignore[union-attr]
        return np.concatenate([parts[r] for r in self.vocab_order], axis=-1)  # type: ignore[union-attr]

    def zeros_cache(self) -> Any:
        import jax
        import jax.numpy as jnp

        return jax.device_put(jnp.zeros(self.cache_shape, self.cache_dtype), self.device)

    # ---- the programs -----------------------------------------------------------------------------
    def program(self, name: Any) -> Callable[..., tuple[Any, ...]]:
        """The program of an exported name (1: the decode step with its logits), compiled with
        the cache (and the slots' state) donated."""
        key = str(name)
        if key not in self.programs:
            import jax

            decode, prefill = DECODE.fullmatch(key), PREFILL.fullmatch(key)
            if name == 1:
                fn, donate = self.model.decode, (3,)
            elif decode:
                fn = decode_program(self.model, int(decode[1]), int(decode[2]), bool(decode[3]))
                donate = (1, 2, 3, 4, 9)
            elif prefill:
                fn = prefill_program(self.model, "xla", int(prefill[3]) if prefill[3] else None)
                donate = (5, 6, 7, 8, 12)
            else:
                raise ProviderError(f"a decoder's per-rank steps have no program {key!r}")
            self.programs[key] = jax.jit(fn, donate_argnums=donate)
        return self.programs[key]

    def describe(self) -> str:
        layers, tp = self.model.layers, self.model.tp
        return (f"a decoder's per-rank steps on {tp} rank(s), MPI between them: per decode step the "
                f"embedding, then per layer attention (this rank's heads and cache) | all-reduce | MLP | "
                f"all-reduce ({2 * layers} all-reduces), the logits head"
                + (" | all-gather of the vocabulary" if self.vocab_order is not None else ""))
