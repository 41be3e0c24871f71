"""Serving throughput and latency: step-level batching against the same server taking one request at a time.

Starts `inkwash serve` (the bundled model unless --model) as a subprocess on loopback, twice: once as is
(continuous batching) and once with `--max-active 1`. For each number of concurrent clients, every client sends
`--requests` generations one after another (n=1, its own prompt and seed, the model's default sampling) and
waits for each; images/s is requests over wall-clock time, latency is per request. Bounded: 1, 4 and 16
clients with 3 requests each take a few minutes on a 2-core CPU.

    python benchmarks/bench_serve.py                      # table + JSON on stdout
    python benchmarks/bench_serve.py --clients 1 4 16 --requests 3 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PROMPTS = ["a red circle", "a blue square above a yellow star", "two green triangles", "a large purple hexagon",
           "an orange diamond on the left", "three white crosses", "a pink circle and a cyan square"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, extra: list[str], data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "inkwash.cli", "serve", "--port", str(port), "--data-dir", data_dir, *extra]
    if args.model:
        cmd += ["--model", args.model]
    cmd += ["--device", args.device, "--precision", args.precision]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read().decode())
    raise SystemExit("the server did not start")


async def load(url: str, clients: int, requests: int, seed0: int, body: dict) -> dict:
    latencies: list[float] = []

    async def client(c: int, http: httpx.AsyncClient):
        for k in range(requests):
            i = seed0 + c * requests + k
            t0 = time.perf_counter()
            r = await http.post("/v1/images/generations", json=body | {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "clients": clients, "requests": len(latencies), "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--device", default="cpu", help="where the server runs the model (cpu, cuda)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    p.add_argument("--order", nargs=2, default=["one_at_a_time", "batched"], help="which server runs first")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    body = {"n": 1} | ({"steps": args.steps} if args.steps else {})
    results = {}
    modes = {"batched": [], "one_at_a_time": ["--max-active", "1"]}
    for mode in args.order:
        extra = modes[mode]
        with tempfile.TemporaryDirectory() as data_dir:
            proc, url = start_server(args, extra, data_dir)
            try:
                asyncio.run(load(url, 1, 3, 10_000, body))  # warm-up
                results[mode] = [asyncio.run(load(url, c, args.requests, 0, body)) for c in args.clients]
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"{'clients':>7} | {'batched img/s':>13} {'p50':>6} {'p95':>6} | {'one-at-a-time img/s':>19} "
          f"{'p50':>6} {'p95':>6} | speed-up")  # fmt: skip
    for b, o in zip(results["batched"], results["one_at_a_time"]):
        print(f"{b['clients']:>7} | {b['images_per_s']:>13.3f} {b['p50_s']:>6.2f} {b['p95_s']:>6.2f} | "
              f"{o['images_per_s']:>19.3f} {o['p50_s']:>6.2f} {o['p95_s']:>6.2f} | "
              f"{b['images_per_s'] / o['images_per_s']:.2f}x")  # fmt: skip
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
    out = {"results": results, "torch": torch.__version__, "device": device, "threads": args.threads or os.cpu_count(),
           "requests_per_client": args.requests, "precision": args.precision,
           "steps": args.steps or "model default"}  # fmt: skip
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
