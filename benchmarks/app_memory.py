"""Memory and temporary files of the app under concurrent clients (a benchmark, not a test).

    python benchmarks/app_memory.py                       # 16 concurrent mixed requests, 3 rounds, 512 px
    python benchmarks/app_memory.py --clients 16 --rounds 3 --resolution 1024

Starts ``python app/main.py`` (the default model) with its own Gradio temporary folder, sends ``--clients``
requests at once (the four views in turn, on the example photos), ``--rounds`` times, and prints one JSON line:
the server's resident memory before, at its peak (sampled every 20 ms) and after; the size of the encoded-image
cache it reports against its cap; and the files in the temporary folder after each round. The app serves two
requests at a time (``default_concurrency_limit=2``); the rest wait in Gradio's queue.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(proc: psutil.Process) -> int:
    try:
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def _files(folder: Path) -> tuple[int, int]:
    found = [p for p in folder.rglob("*") if p.is_file()]
    return len(found), sum(p.stat().st_size for p in found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    from gradio_client import Client, handle_file

    sys.path.insert(0, str(ROOT))
    from capi_lab.explore import example_photos

    photos = [str(p) for p in example_photos()]
    tmp = Path(tempfile.mkdtemp(prefix="capi_app_tmp_"))
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp)}
    server = subprocess.Popen([sys.executable, str(ROOT / "app" / "main.py"), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("error: the app did not start") from None
                time.sleep(0.5)
        proc = psutil.Process(server.pid)
        client = Client(url, verbose=False)
        before = _rss(proc)
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss(proc))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        r = args.resolution

        def call(i: int):
            photo = handle_file(photos[i % len(photos)])
            view = i % 4
            if view == 0:
                return client.predict([photo], r, 4, api_name="/pca")
            if view == 1:
                return client.predict([photo], r, False, 12, api_name="/clusters")
            if view == 2:
                return client.predict([photo], 0, r, "inverse_block", 0.65, True, i, api_name="/reconstruct")
            return client.predict([photo], 0, 1, 2, r, api_name="/similarity")

        rounds = []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(call, range(k * args.clients, (k + 1) * args.clients)))
            n, size = _files(tmp)
            rounds.append({"seconds": round(time.perf_counter() - t0, 1), "temp_files": n,
                           "temp_mb": round(size / 2**20, 1), "peak_rss_mb": round(peak[0] / 2**20)})  # fmt: skip
        stop.set()
        sampler.join()
        row = {
            "clients": args.clients, "resolution": r, "rounds": rounds,
            "rss_before_mb": round(before / 2**20), "rss_peak_mb": round(peak[0] / 2**20),
            "rss_after_mb": round(_rss(proc) / 2**20),
        }  # fmt: skip
        print(json.dumps(row))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
