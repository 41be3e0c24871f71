"""Durable jobs: `inkwash serve` killed with SIGKILL mid-queue loses nothing. Queued and interrupted jobs run
after the restart, finished results stay listed with their images byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def start(model_file, data_dir, port) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "inkwash.cli", "serve", "--model", str(model_file), "--data-dir", str(data_dir),
           "--port", str(port), "--max-active", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
    raise AssertionError("the server did not start")


def test_sigkill_then_restart_loses_nothing(model_file, tmp_path, free_port):
    port = free_port
    url = f"http://127.0.0.1:{port}"
    proc = start(model_file, tmp_path, port)
    try:
        done = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "steps": 2, "seed": 5},
                          timeout=60).json()  # fmt: skip
        image_before = httpx.get(f"{url}/v1/images/files/{done['id']}/0.png").content
        slow = {"prompt": "a blue square", "steps": 100, "sampler": "heun"}
        pending = [httpx.post(f"{url}/v1/jobs", json=slow | {"seed": i}).json()["id"] for i in range(4)]
        while httpx.get(f"{url}/v1/jobs/{pending[0]}").json()["status"] == "queued":
            time.sleep(0.01)
        statuses = [httpx.get(f"{url}/v1/jobs/{j}").json()["status"] for j in pending]
        assert statuses[0] == "running" and "queued" in statuses
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    proc = start(model_file, tmp_path, port)
    try:
        for job_id in pending:
            for _ in range(3000):
                job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
                if job["status"] not in ("queued", "running"):
                    break
                time.sleep(0.02)
            assert job["status"] == "succeeded" and len(job["images"]) == 1
        listed = [j["id"] for j in httpx.get(f"{url}/v1/gallery").json()["data"]]
        assert sorted(listed) == sorted(pending + [done["id"]])
        assert httpx.get(f"{url}/v1/images/files/{done['id']}/0.png").content == image_before
    finally:
        proc.terminate()
        proc.wait(10)
