"""One rank under mpiexec: run the export once, then report which TCP sockets this process
listens on: MPI's own (open once MPI started) apart from those dinb opened (JAX's coordinator,
gloo). Rank 0 prints one JSON line with every rank's report."""

import json
import os
import subprocess
import sys

import numpy as np
from mpi4py import MPI  # noqa: F401  (MPI starts first: its sockets are told apart from dinb's)

import dinb


def listening() -> set[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if f"pid={os.getpid()}," in line}


mpi_own = listening()
model = dinb.Model()
config = sys.argv[2] if len(sys.argv) > 2 else None
model.build_from_file(sys.argv[1], dinb.ModelType.DINB, dinb.Context(), config)
inputs = model.get_inputs()
for t in inputs:
    t.set_data_from_numpy(np.ones(t.shape, t.dtype))
value = float(model.predict(inputs)[0].get_data_to_numpy().flat[0])
job = model.job
report = {"rank": job.process_index, "value": value, "dinb": sorted(listening() - mpi_own),
          "mpi": sorted(mpi_own), "collectives": model.collectives, "addresses": job.addresses,
          "coordinator": job.coordinator}
reports = job.allgather("listening", json.dumps(report))
if job.process_index == 0:
    print("REPORT " + json.dumps([json.loads(r) for r in reports]), flush=True)
dinb.shutdown_ranks()
