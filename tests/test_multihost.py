"""Sharded DiT forward and sampling with `jax.process_count() > 1`: two JAX processes on localhost, 4 emulated
CPU devices each, form one 8-device mesh (gloo collectives); the gathered results must equal the
single-device ones. The processes run tests/workers/multihost.py; process 0 prints the errors as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import emulated_devices_flags

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "multihost.py"
TIMEOUT_S = 600
MESHES = ("fsdp=4,tensor=2", "data=8")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(folder, workdir: Path, timeout_s: float = TIMEOUT_S) -> tuple[list[int], list[str], str]:
    """Runs both processes; returns their exit codes and stderrs, and process 0's JSON (workdir/results.json,
    "" if none). Whatever happens, no process is left running: on a failure of either (the other would wait
    on it forever) or the timeout, both are killed."""
    env = dict(os.environ, XLA_FLAGS=emulated_devices_flags(4), PYTHONPATH=str(REPO),
               JAX_PLATFORMS="cpu")
    port = free_port()
    procs, logs = [], []
    try:
        for process_id in range(2):
            # stdout (gloo's connection messages) and stderr stay in workdir for a failure's diagnosis.
            name = workdir / f"process{process_id}"
            logs.append((open(f"{name}.out", "w"), open(f"{name}.err", "w+")))
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(folder), str(port), str(process_id),
                                           str(workdir / "results.json")], cwd=REPO, env=env, stdout=logs[-1][0],
                                          stderr=logs[-1][1], stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
        stderrs = []
        for out, err in logs:
            err.seek(0)
            stderrs.append(err.read())
            out.close()
            err.close()
    results = workdir / "results.json"
    # A process killed here reports -9.
    return [p.returncode for p in procs], stderrs, results.read_text() if results.exists() else ""


@pytest.fixture(scope="module")
def multihost_results(tiny_folder, tmp_path_factory):
    codes, stderrs, results = run_workers(tiny_folder, tmp_path_factory.mktemp("multihost"))
    assert codes == [0, 0], "\n\n".join(f"process {i}: exit {c}\n{e[-3000:]}" for i, (c, e) in
                                        enumerate(zip(codes, stderrs, strict=True)))
    return json.loads(results)


def test_two_processes_form_one_mesh(multihost_results):
    assert multihost_results["process_count"] == 2 and multihost_results["global_devices"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_multiprocess_forward_and_loop_equal_single_device(multihost_results, mesh):
    result = multihost_results[mesh]
    # host: identical numpy inputs in both processes; global: arrays built from each process's own rows;
    # loaded_into_mesh: load_transformer(mesh=) instead of shard_model.
    errors = {key: value for key, value in result.items() if key.startswith(("forward", "loop"))}
    expected = {"forward_host", "forward_global", "forward_loaded_into_mesh", "loop_host", "loop_global"}
    assert expected <= set(errors), result
    assert all(error <= 1e-5 for error in errors.values()), errors


def test_parameters_are_split_across_processes(multihost_results):
    assert multihost_results["fsdp=4,tensor=2"]["gate_proj"] == [2, 256, 512]
    assert multihost_results["fsdp=4,tensor=2"]["gate_proj_shard"] == [2, 64, 256]  # embed/fsdp, mlp/tensor
    assert multihost_results["data=8"]["gate_proj_shard"] == [2, 256, 512]  # inference rules: replicated
