"""``%dinfer`` and ``%%dinfer``: the notebook face of :mod:`dinb.notebook.cluster` (``%load_ext dinb``).

Each subcommand is one call of the Python API, so everything here can be done without magics.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from dinb.errors import DinbError
from dinb.notebook import cluster as cl

USAGE = """Run a model split over notebook ranks (ipyparallel engines, one rank each).

Subcommands (each is one call of dinb.notebook.cluster's Python API):

  %dinfer cluster start -n 2 [--engines mpi|local|ssh|slurm] [--devices cpu|gpu]
        [--hosts a,b | --hosts HOSTFILE] [--controller-ip ADDRESS] [--cold]
        start N engines bound to devices, joined in one JAX job     start_cluster(n, ...)
        (mpi or ssh engines spread over --hosts; the controller listens on --controller-ip;
        forked from a warm process that imported them once; --cold: each imports itself)
  %dinfer cluster status       rank, pid, device, memory, loaded model     current().status()
  %dinfer cluster stop         leave the job, stop the engines             current().stop()
  %dinfer cluster restart      fresh engines, reload the model             current().restart()
  %dinfer context --target cpu --provider xla
        build every rank's Context                                  current().context(...)
  %dinfer load DIR             each rank loads its own slice file          current().load(DIR)
  %dinfer predict EXPR [EXPR ...] [--micro-batches M] [--timeout S]
        the same inputs (evaluated here) to every rank (the first stage's ranks, with pipeline
        stages), predict                                            current().predict(*arrays)
  %dinfer generate "PROMPT" [--ids 1,5,9] [--chat] [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S]    a decoder's export: tokens printed as the ranks pick
        them (--chat: the prompt as a user's message through the model's chat template)
                                                   current().generate(ids, N, on_token=...)
  %dinfer outputs [REF_EXPR]   per-rank outputs of the last predict, one panel per rank
        (with a difference against REF_EXPR when given)    RankOutputs(current().outputs())
  %dinfer schedule             pipeline stages: the last predict's schedule as it ran, and
        its bubble against GPipe's formula                 SchedulePicture(current().timeline())
  %dinfer strategy             the loaded model's strategy as a table      current().strategy()
  %dinfer serve ADDRESS | stop  every rank serves the loaded model as an Agent of the servable
        whose Distributed Worker listens at ADDRESS (host:port)      current().serve(ADDRESS)
  %dinfer explore [MODEL|DIR] [-n N]
        the strategy explorer (no cluster needed)           StrategyExplorer(MODEL, devices=N)

  %%dinfer [--timeout S]       run the cell on every rank, output grouped by rank
                                                                    current().execute(code)
Examples:
  %dinfer cluster start -n 2
  %dinfer load out/matmul
  %dinfer predict np.ones((128, 96), np.float32)
  %dinfer outputs np.full((128, 16), -48.0)
  %dinfer explore mlp -n 4
"""


@magics_class
class DinferMagics(Magics):
    @line_magic
    def dinfer(self, line: str) -> Any:
        words = shlex.split(line)
        if not words or words[0] in ("-h", "--help", "help"):
            print(USAGE)
            return None
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise DinbError(f"unknown %dinfer subcommand {command!r}; see %dinfer? for the list")
        return handler(" ".join(shlex.quote(w) for w in rest), line)

    dinfer.__doc__ = USAGE

    @cell_magic("dinfer")
    def dinfer_cell(self, line: str, cell: str) -> None:
        args = parse_argstring(self._cell_args, line)
        outputs = cl.current().execute(cell, timeout_s=args.timeout)
        for rank, text in outputs.items():
            print(f"[rank {rank}]")
            print(text.rstrip("\n") if text.strip() else "(no output)")

    @magic_arguments()
    @argument("--timeout", type=float, default=None, help="seconds before the stuck ranks are named")
    def _cell_args(self, line: str) -> None:
        """%%dinfer [--timeout S]"""

    # ---- subcommands ----------------------------------------------------------------------------
    @magic_arguments()
    @argument("action", choices=["start", "status", "stop", "restart"])
    @argument("-n", type=int, default=2, help="number of ranks")
    @argument("--engines", default="mpi", choices=list(cl.ENGINES))
    @argument("--devices", default="cpu", choices=["cpu", "gpu"])
    @argument("--hosts", default=None, help="hosts for mpi or ssh engines: a,b,c or a hostfile")
    @argument("--controller-ip", default=None, help="where the controller listens (engines elsewhere)")
    @argument("--cold", action="store_true",
              help="engines import everything themselves instead of being forked from a warm process")
    def _cluster(self, line: str) -> None:
        """%dinfer cluster start|status|stop|restart [-n N] [--engines mpi|local|ssh|slurm]
        [--devices cpu|gpu] [--hosts a,b | --hosts HOSTFILE] [--controller-ip ADDRESS] [--cold]"""

    def _cmd_cluster(self, rest: str, line: str) -> Any:
        args = parse_argstring(self._cluster, rest)
        if args.action == "start":
            hosts = args.hosts
            if hosts is not None and not Path(hosts).is_file():
                hosts = [h for h in hosts.split(",") if h]
            c = cl.start_cluster(args.n, engines=args.engines, devices=args.devices, hosts=hosts,
                                 controller_ip=args.controller_ip, warm=False if args.cold else None)
            print(f"{c.n} ranks ready ({args.engines} engines, devices {', '.join(c.device_names)})")
        elif args.action == "status":
            c = cl.current()
            print(f"coordinator {c.coordinator} (rank 0)")
            print(rank_table(c.status()))
        elif args.action == "stop":
            n = cl.current().n
            cl.stop_cluster()
            print(f"stopped {n} ranks")
        else:
            c = cl.current().restart()
            print(f"restarted {c.n} ranks" + (", model reloaded" if c.model_dir else ""))
        return None

    @magic_arguments()
    @argument("address", help="the Distributed Worker's host:port, or 'stop'")
    def _serve(self, line: str) -> None:
        """%dinfer serve ADDRESS | stop"""

    def _cmd_serve(self, rest: str, line: str) -> None:
        args = parse_argstring(self._serve, rest)
        c = cl.current()
        if args.address == "stop":
            c.stop_serving()
            print(f"{c.n} ranks stopped serving")
        else:
            c.serve(args.address)
            print(f"{c.n} ranks serve {c.model_dir} as agents of the worker at {args.address}")

    @magic_arguments()
    @argument("--target", default="cpu", choices=["cpu", "gpu"])
    @argument("--provider", default="xla", choices=["xla", "tensorrt"])
    def _context(self, line: str) -> None:
        """%dinfer context --target cpu --provider xla"""

    def _cmd_context(self, rest: str, line: str) -> None:
        args = parse_argstring(self._context, rest)
        cl.current().context(args.target, args.provider)
        print(f"context on {cl.current().n} ranks: target {args.target}, provider {args.provider}")

    @magic_arguments()
    @argument("model_dir", help="export directory (one slice file per rank)")
    def _load(self, line: str) -> None:
        """%dinfer load DIR"""

    def _cmd_load(self, rest: str, line: str) -> None:
        args = parse_argstring(self._load, rest)
        c = cl.current()
        info = c.load(args.model_dir)
        inputs = ", ".join(f"{n}{tuple(s)} {d}" for n, s, d in info["inputs"])
        pipe = info.get("pipeline")
        stages = (f" as {pipe['stages']} stages x {pipe['stage_ranks']} ranks (micro-batches "
                  f"{pipe['micro_batches']}, activations over {pipe['transfer']})" if pipe else "")
        print(f"loaded {info['model']} on {c.n} ranks{stages}, each from its own slice file; "
              f"inputs: {inputs}")

    def _cmd_predict(self, rest: str, line: str) -> Any:
        text, options = trailing_options(line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else "",
                                         ("--timeout", "--micro-batches"))
        if not text.strip():
            raise DinbError("usage: %dinfer predict EXPR [EXPR ...]  (e.g. np.ones((128, 96), np.float32))")
        ns = self.shell.user_ns if self.shell is not None else {}
        value = eval(f"({text.strip()},)", ns)
        c = cl.current()
        micro = options.get("--micro-batches")
        result = c.predict(*value, timeout_s=options.get("--timeout"),
                           micro_batches=int(micro) if micro is not None else None)
        ranks = list(c.roles.output_ranks)
        who = f"all {c.n} ranks" if len(ranks) == c.n else f"last-stage ranks {ranks}"
        for i, out in enumerate(result.outputs):
            print(f"output {i}: shape {list(out.shape)} {out.dtype}; {who} agree: {result.agree}")
        return result.outputs[0] if len(result.outputs) == 1 else result.outputs

    @magic_arguments()
    @argument("prompt", nargs="?", default=None, help="the prompt as text (the export's tokenizer)")
    @argument("--ids", default=None, help="the prompt as token ids: 1,5,9")
    @argument("--max-new-tokens", type=int, default=None,
              help="default: as many as the cache holds after the prompt, at most 64")
    @argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    @argument("--top-k", type=int, default=None)
    @argument("--top-p", type=float, default=None)
    @argument("--seed", type=int, default=0)
    @argument("--chat", action="store_true", help="the prompt is a user's message, through the chat template")
    @argument("--timeout", type=float, default=None)
    def _generate(self, line: str) -> None:
        """%dinfer generate "PROMPT" | --ids 1,5,9 [--max-new-tokens N] [--temperature T] ..."""

    def _cmd_generate(self, rest: str, line: str) -> None:
        from dinb.export.slicefile import find_slice_files, read_meta
        from dinb.models.text import TextStream, default_new_tokens, ms_per_step, token_codec

        args = parse_argstring(self._generate, rest)
        c = cl.current()
        if c.model_dir is None:
            raise DinbError("no model is loaded; run `%dinfer load DIR` (a decoder's export) first")
        meta = read_meta(find_slice_files(c.model_dir)[0])
        if "generation" not in meta:
            raise DinbError(f"{c.model_dir} holds {meta['model']!r}, which does not generate; load a "
                            "decoder's export (--model llama)")
        codec = token_codec(meta["model_config"].get("model_dir"), meta["model_config"]["config"])
        if (args.prompt is None) == (args.ids is None):
            raise DinbError("give the prompt as text or as --ids, one of the two: "
                            '%dinfer generate "123+456="')
        if args.chat and args.prompt is not None:
            ids = codec.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            ids = [int(v) for v in args.ids.split(",")] if args.ids else codec.encode(args.prompt)
        print(args.prompt if args.prompt is not None else args.ids, end="", flush=True)
        count = args.max_new_tokens or default_new_tokens(meta["generation"]["max_len"], [len(ids)])
        tokens = c.generate(ids, count, timeout_s=args.timeout, on_token=TextStream(codec),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
        ms = ms_per_step(c.last_generation["timings"])
        print(f"\n[{len(tokens)} tokens on {c.n} ranks; decode {ms:.1f} ms per token; every rank "
              "picked the same]")

    def _cmd_schedule(self, rest: str, line: str) -> None:
        from IPython.display import display

        from dinb.widgets import SchedulePicture

        events = cl.current().timeline()
        if not events:
            raise DinbError("no pipelined predict has run: load an export with pipeline stages and "
                            "run `%dinfer predict ... --micro-batches M` first")
        display(SchedulePicture(events))

    def _cmd_outputs(self, rest: str, line: str) -> None:
        from IPython.display import display

        from dinb.widgets import RankOutputs

        text = line.split(None, 1)[1].strip() if len(line.split(None, 1)) > 1 else ""
        reference = eval(text, self.shell.user_ns if self.shell is not None else {}) if text else None
        display(RankOutputs(cl.current().outputs(), reference=reference))

    @magic_arguments()
    @argument("model", nargs="?", default="mlp", help="a built-in model name or an export directory")
    @argument("-n", type=int, default=None, help="number of devices")
    def _explore(self, line: str) -> None:
        """%dinfer explore [MODEL|DIR] [-n N]"""

    def _cmd_explore(self, rest: str, line: str) -> None:
        from pathlib import Path

        from IPython.display import display

        from dinb.widgets import StrategyExplorer

        args = parse_argstring(self._explore, rest)
        model = Path(args.model) if Path(args.model).is_dir() else args.model
        display(StrategyExplorer(model, devices=args.n))

    def _cmd_strategy(self, rest: str, line: str) -> None:
        strategy = cl.current().strategy()
        staged = strategy.pipeline_stages > 1
        print(f"{'parameter':<16} {'shape':<14} {'dev_matrix':<12} {'tensor_map':<14}"
              + (" stage" if staged else ""))
        for name in strategy:
            rec = strategy.item(name)
            print(f"{name:<16} {str(list(rec.shape or ())):<14} {str(list(rec.layout.dev_matrix)):<12} "
                  f"{str(rec.layout.to_json()['tensor_map']):<14}" + (f" {rec.stage}" if staged else ""))


def trailing_options(text: str, flags: Sequence[str]) -> tuple[str, dict[str, float]]:
    """``text`` without the options at its end (``EXPR --timeout 10 --micro-batches 4``, in any
    order), and the options' values. A flag without a number is an error naming it."""
    options: dict[str, float] = {}
    while True:
        match = re.search(r"\s(--[a-z-]+)(?:\s+(\S+))?\s*$", f" {text}")
        if match is None or match.group(1) not in flags:
            return text, options
        flag, value = match.group(1), match.group(2)
        try:
            options[flag] = float(value)
        except (TypeError, ValueError):
            raise DinbError(f"{flag} takes a number, got {value!r}") from None
        text = f" {text}"[:match.start()].strip()


def rank_table(rows: list[dict[str, Any]]) -> str:
    """The status rows as a table (device memory only when an accelerator reports it)."""
    keys = ["rank", "pid", "alive", "host", "address", "device", "kind", "device_mem", "rss_mib", "provider",
            "collectives", "loaded"]
    keys = [k for k in keys if k in ("rank", "pid", "alive") or any(row.get(k) is not None for row in rows)]
    cells = [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(DinferMagics)
