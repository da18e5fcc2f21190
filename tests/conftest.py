"""Test set-up: this pytest process simulates 8 ranks (8 virtual CPU devices), and every
temporary file of the session (this process's and every process it starts: ranks, engines,
servers) goes into one folder of its own, which must hold nothing but pytest's own folders at
the end; MPICH's shared-memory files in /dev/shm are counted before and after."""

import atexit
import os
import shutil
import tempfile

import pytest

# a process the tests start may import this file too (to unpickle a test's model): it keeps the
# session's folder. The process that made the folder removes it when it exits, whether a session
# ran or not (``pytest --collect-only`` runs none).
SESSION_TMP = os.environ.get("DINB_TEST_SESSION_TMP") or ""
if not SESSION_TMP:
    SESSION_TMP = tempfile.mkdtemp(prefix="dinb-tests-")
    atexit.register(shutil.rmtree, SESSION_TMP, ignore_errors=True)
os.environ["DINB_TEST_SESSION_TMP"] = os.environ["TMPDIR"] = SESSION_TMP  # inherited by every process
tempfile.tempdir = None  # gettempdir() reads TMPDIR again

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.devices()  # the 8 devices exist from the start, whichever test asks for ranks first


# ONNX Runtime's own first-launch marker (an empty file its usage collector writes once per
# temporary folder, whatever the caller): not dinb's to remove
NOT_OURS = {".ses"}


def _mpich_shm() -> set[str]:
    if not os.path.isdir("/dev/shm"):
        return set()
    return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """Fails the session when dinb (or a process it started) left a temporary file or folder, or
    an MPICH shared-memory file, behind."""
    shm_before = _mpich_shm()
    yield
    left = {n: sorted(os.listdir(os.path.join(SESSION_TMP, n)))[:5]
            if os.path.isdir(os.path.join(SESSION_TMP, n)) else [] for n in os.listdir(SESSION_TMP)
            if not n.startswith("pytest-of-") and n not in NOT_OURS}
    shm_left = sorted(_mpich_shm() - shm_before)
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
    assert not left and not shm_left, (
        f"the tests left {left} (a folder with what it holds) in the temporary folder and "
        f"{shm_left} in /dev/shm")


@pytest.fixture(scope="session")
def devices():
    return sorted(jax.devices(), key=lambda d: d.id)


def simulated(n: int):
    """Make this process a simulated job of ``n`` ranks (re-usable with a smaller n)."""
    import dinb

    return dinb.init_ranks("cpu", simulate=n)
