#!/usr/bin/env bash
# `make pi-check`: a fleetfl device on aarch64, proven under qemu-user.
#
# 1. An arm64 Debian bookworm root (debootstrap, run once; kept in $PI_ROOT) with Python 3.11.
# 2. The `[device]` install in it, locked: locks/device-aarch64.txt (aarch64 wheels from PyPI:
#    torch 2.10 CPU, Flower, numpy...) and this checkout's fleetfl wheel, no dependencies.
# 3. A coordinator on this host (127.0.0.1, plain HTTP: a loopback check), 1 device, 2 rounds of
#    the digits CNN; the device is `fleetfl client start` inside the root (chroot), every
#    aarch64 instruction emulated by qemu-aarch64-static through binfmt_misc.
# 4. One JSON line on stdout: seconds to install, to register, per round; the device's peak RSS
#    as the host sees it (qemu's own code cache included, so an upper bound).
#
# Needs: root (chroot, mounts, binfmt_misc), qemu-user-static, debootstrap and the Debian mirror
# (apt-get install qemu-user-static debootstrap). Exits 3 with the reason when one is missing.
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
PI_ROOT="${PI_ROOT:-/var/tmp/fleetfl-arm64}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PY:-$HERE/.venv/bin/python}"
ROUNDS="${ROUNDS:-2}"
QEMU=/usr/bin/qemu-aarch64-static

missing() { echo "pi-check: $1" >&2; exit 3; }
[ "$(id -u)" = 0 ] || missing "needs root (chroot, bind mounts, binfmt_misc)"
[ -x "$QEMU" ] || missing "no $QEMU (apt-get install qemu-user-static)"
command -v debootstrap >/dev/null || missing "no debootstrap (apt-get install debootstrap)"
[ -x "$PY" ] || missing "no $PY: run 'make install-dev' first"

# binfmt_misc: aarch64 ELF files run through qemu, also inside the chroot ('F': the
# interpreter is opened now, so the chroot needs no copy of it).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
        missing "cannot mount binfmt_misc"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":qemu-aarch64:M::${magic}:${mask}:${QEMU}:F" > /proc/sys/fs/binfmt_misc/register ||
        missing "cannot register qemu-aarch64 with binfmt_misc"
fi

t0=$(date +%s.%N)
if [ ! -e "$PI_ROOT/.debootstrapped" ]; then
    rm -rf "$PI_ROOT"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates bookworm "$PI_ROOT" "$MIRROR" >&2
    touch "$PI_ROOT/.debootstrapped"
fi
cp /etc/resolv.conf "$PI_ROOT/etc/resolv.conf"
# The host's CA bundle, so pip in the root trusts what the host trusts (a TLS-inspecting proxy).
HOST_CA="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
[ -f "$HOST_CA" ] && cp "$HOST_CA" "$PI_ROOT/etc/ssl/certs/ca-certificates.crt"
# Commands in the root get a clean environment: the host's PIP_*/SSL_* settings name host paths.
IN_ROOT=(chroot "$PI_ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root
         LANG=C.UTF-8)

cleanup() {
    [ -n "${COORD_PID:-}" ] && kill -TERM -- "-$COORD_PID" 2>/dev/null || true
    [ -n "${DEVICE_PID:-}" ] && kill -TERM -- "-$DEVICE_PID" 2>/dev/null || true
    sleep 2
    for m in proc sys dev; do umount -l "$PI_ROOT/$m" 2>/dev/null || true; done
}
trap cleanup EXIT
for m in proc sys dev; do mount --bind "/$m" "$PI_ROOT/$m"; done

# The device install: the aarch64 lock, then this checkout's wheel (rebuilt every time).
WORK="$PI_ROOT/opt/pi-check"
rm -rf "$WORK" && mkdir -p "$WORK"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK" "$HERE" >&2
cp "$HERE/locks/device-aarch64.txt" "$WORK/"
WHEEL="$(basename "$(ls "$WORK"/fleetfl-*.whl)")"
t1=$(date +%s.%N)
"${IN_ROOT[@]}" /bin/sh -ec "
    [ -x /opt/fleetfl/bin/python ] || python3 -m venv /opt/fleetfl
    /opt/fleetfl/bin/python -m pip install -q --disable-pip-version-check \
        --require-hashes -r /opt/pi-check/device-aarch64.txt
    /opt/fleetfl/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        --force-reinstall /opt/pi-check/$WHEEL" >&2
t2=$(date +%s.%N)

# The coordinator on the host; one shard for the device.
cd "$WORK"
"$PY" -m fleetfl.coordinator.cli data split --dataset digits --num-clients 1 --out shards >&2
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
setsid "$PY" -m fleetfl.coordinator.cli coordinator start --insecure --state state \
    --address "127.0.0.1:$PORT" --set federation.rounds="$ROUNDS" \
    --set federation.num_clients=1 --set federation.clients_per_round=1 \
    --set federation.round_timeout_s=3600 --set "fleet.mix={rpi4=1}" \
    > coordinator.log 2>&1 &
COORD_PID=$!
t3=$(date +%s.%N)
setsid "${IN_ROOT[@]}" /opt/fleetfl/bin/fleetfl client start --insecure \
    --coordinator "127.0.0.1:$PORT" --data /opt/pi-check/shards/client-0.npz --device rpi4 \
    --workdir /opt/pi-check/device --retries 20 > device.log 2>&1 &
DEVICE_PID=$!

peak=0
while kill -0 "$COORD_PID" 2>/dev/null; do
    for pid in $(pgrep -f "pi-check/device" || true); do
        hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
    done
    [ -z "${registered:-}" ] && grep -q "Sending: query message" device.log 2>/dev/null &&
        registered=$(date +%s.%N)
    sleep 1
done
wait "$COORD_PID" || { tail -30 coordinator.log device.log >&2; exit 1; }
COORD_PID=

"$PY" - "$t0" "$t1" "$t2" "$t3" "${registered:-0}" "$peak" <<'EOF'
import json, sys
t0, t1, t2, t3, reg, peak = (float(v) for v in sys.argv[1:])
rows = [json.loads(line) for line in open("state/rounds/metrics.jsonl")]
walls = [r["wall_time_s"] for r in rows]
print(json.dumps({
    "benchmark": "pi_check", "arch": "aarch64 under qemu-user", "rounds": len(rows),
    "root_and_wheel_s": round(t1 - t0, 1), "device_install_s": round(t2 - t1, 1),
    "register_s": round(reg - t3, 1) if reg else None,
    "round_wall_s": [round(b - a, 1) for a, b in zip([0.0] + walls, walls)],
    "failed_client_rounds": sum(r["failed"] for r in rows),
    "device_peak_rss_mib_upper_bound": round(peak / 1024, 1),
}))
EOF
