"""Peak memory of the image under a small load: the figure deploy/k8s's memory request and
limit are set from (docs/deploy.md, "Resources").

    . scripts/image/lib.sh && podman_setup && uv run python scripts/image/measure_rss.py

Starts localhost/ingest:latest embedded (or, --production, with deploy/k8s's config against
the test servers) with INGEST_WORKERS=2 (as deploy/k8s runs it), posts
`--records` signed records in JSON arrays of 500 for `--seconds`, and samples the summed RSS
of every process in the container (from the host's /proc) every 0.2 s."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ingest.auth import credentials as C  # noqa: E402
from tests.e2e._auth import credentials, sign_headers  # noqa: E402
from tests.e2e._service import free_port  # noqa: E402


def rss_bytes(pid: int) -> int:
    """RSS of pid and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


def production(data: Path, port: int, image: str) -> list[str]:
    """podman run arguments for deploy/k8s's config, its hosts replaced by the test servers'."""
    cm = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "configmap.yaml").read_text())
    text = cm["data"]["ingest.yaml"].replace("kafka:9092", os.environ["INGEST_TEST_KAFKA_BROKERS"])
    (data / "ingest.yaml").write_text(text)
    return [
        "--network", "host",
        "-e", f"INGEST_POSTGRES_URL={os.environ['INGEST_TEST_POSTGRES_URL']}",
        "-e", f"INGEST_REDIS_URL={os.environ['INGEST_TEST_REDIS_URL']}",
        "-e", f"INGEST_HTTP_PORT={port}",
        image, "run", "--config", "/var/lib/ingest/ingest.yaml",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--image", default="localhost/ingest:latest")
    ap.add_argument("--workers", type=int, default=2, help="INGEST_WORKERS (deploy/k8s: 2)")
    ap.add_argument(
        "--production",
        action="store_true",
        help="run deploy/k8s's ConfigMap config (production mode: Kafka intake and source, "
        "Postgres sink and state, Redis) against the servers of scripts/services/up.sh "
        "postgres redis kafka (INGEST_TEST_* from its all.env), on the host's network",
    )
    args = ap.parse_args()
    port, name = free_port(), f"ingest-rss-{os.getpid()}"
    data = Path(tempfile.mkdtemp(prefix="ingest-rss-"))
    os.chown(data, 10001, 10001)
    env = {**os.environ, "INGEST_CREDENTIALS": C.dump(credentials())}
    run = ["podman", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp"]
    run += [
        "-v",
        f"{data}:/var/lib/ingest",
        "-e",
        "INGEST_CREDENTIALS",
        "-e",
        f"INGEST_WORKERS={args.workers}",
    ]
    if args.production:
        run += production(data, port, args.image)
    else:
        run += ["-p", f"127.0.0.1:{port}:8080", args.image]
    subprocess.run(run, check=True, env=env, capture_output=True)
    try:
        pid = int(
            subprocess.run(
                ["podman", "inspect", "-f", "{{.State.Pid}}", name],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            sys.exit(f"not ready:\n{logs.stdout}{logs.stderr}")
        idle = rss_bytes(pid)
        peak, sent, t0 = idle, 0, time.monotonic()
        per = 500
        with httpx.Client(timeout=30) as client:
            while time.monotonic() - t0 < args.seconds:
                if sent < args.records:
                    body = (
                        b"["
                        + b",".join(
                            orjson.dumps(
                                {
                                    "schema_version": 3,
                                    "tenant_id": "acme-corp",
                                    "entity_type": "order",
                                    "entity_id": f"o-{sent + i}",
                                    "revision": 1,
                                    "occurred_at": "2025-01-01T00:00:00Z",
                                    "attributes": {"amount": i, "note": "x" * 200},
                                }
                            )
                            for i in range(per)
                        )
                        + b"]"
                    )
                    r = client.post(
                        f"{url}/v1/webhooks/acme-corp/orders",
                        content=body,
                        headers=sign_headers("acme-corp", body),
                    )
                    if r.status_code == 202:
                        sent += per
                    else:
                        time.sleep(0.2)
                peak = max(peak, rss_bytes(pid))
                time.sleep(0.05)
        mib = 1024 * 1024
        print(
            f"idle RSS {idle / mib:.0f} MiB, peak RSS {peak / mib:.0f} MiB, "
            f"{sent} records posted in {args.seconds:.0f}s, workers={args.workers}, "
            f"{'production (deploy/k8s config)' if args.production else 'embedded'}"
        )
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
