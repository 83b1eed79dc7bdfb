#!/usr/bin/env bash
# Measures the native side in one run (release build), on this machine:
#   - publisher throughput (batches/s, MB/s of WAL) to file:// and to moto's S3 server;
#   - catch-up of N small batches from `walcast serve` (batches/s, GETs);
#   - publish-to-visible lag p50/p99 at a 100 ms flush interval and 100 ms poll (walcast demo).
# Usage: bash scripts/measure-native.sh [N=1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
cargo build --release -q -p walcast
bash scripts/e2e-deps.sh >/dev/null
W=$PWD/target/release/walcast
T=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
secs() { python3 -c "import time; print(time.time())"; }
rate() { python3 -c "print(f'{$1/($3-$2):,.0f}')"; }

echo "machine: $(nproc) cores, $(uname -sr)"
python3 - "$N" > "$T/in.ndjson" <<'PY'
import json, sys
n = int(sys.argv[1])
for i in range(n):
    print(json.dumps({"op": "put", "key": "key:%08d" % (i % (n // 2 + 1)), "value": "v" * 100}))
PY
t0=$(secs); $W write --wal "$T/wal" < "$T/in.ndjson" > /dev/null; t1=$(secs)
WALMB=$(python3 -c "import os; print(os.path.getsize('$T/wal/wal.log')/1e6)")
echo "write:   $N batches in $(python3 -c "print(f'{$t1-$t0:.2f}')") s ($(rate $N $t0 $t1) batches/s), WAL $WALMB MB"

t0=$(secs); $W publish --wal "$T/wal" --to "file://$T/ds" --once --segment-bytes 8MiB --snapshot-every 0 2>/dev/null; t1=$(secs)
echo "publish to file://: $(rate $N $t0 $t1) batches/s, $(python3 -c "print(f'{$WALMB/($t1-$t0):.1f}')") MB/s"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.tools/moto/bin/moto_server -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -s "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
.tools/moto/bin/python -c "import boto3; boto3.client('s3', endpoint_url='$AWS_ENDPOINT_URL').create_bucket(Bucket='bench')"
t0=$(secs); $W publish --wal "$T/wal" --to s3://bench/ds --once --segment-bytes 8MiB --snapshot-every 0 2>/dev/null; t1=$(secs)
echo "publish to moto s3://: $(rate $N $t0 $t1) batches/s, $(python3 -c "print(f'{$WALMB/($t1-$t0):.1f}')") MB/s"

$W serve "$T/ds" --addr 127.0.0.1:0 > "$T/serve.out" & PIDS+=($!)
for _ in $(seq 100); do grep -q listening "$T/serve.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.*listening on //p' "$T/serve.out")
t0=$(secs); WALCAST_REPLICATE_STATS=1 $W replicate "$URL" --local "$T/r" --once 2> "$T/rep.err"; t1=$(secs)
echo "catch-up from walcast serve: $N batches in $(python3 -c "print(f'{$t1-$t0:.2f}')") s ($(rate $N $t0 $t1) batches/s), $(grep -o 'requests=[0-9]*' "$T/rep.err")"

$W demo --duration 30s --rate 1000 | tail -2
