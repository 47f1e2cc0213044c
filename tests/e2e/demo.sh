#!/bin/sh
# The main job: boot a small locally made image as a microVM and print its output.
# Called by `cargo xtask demo`, which installs the packages, builds hearth and fetches the kernel
# and sets BIN, HEARTH_INIT, KERNEL and MODULES.
set -eu
: "${BIN:?}" "${HEARTH_INIT:?}" "${KERNEL:?}" "${MODULES:?}"
work=$(mktemp -d /tmp/hearth-demo.XXXXXX)
sock="$work/hearthd.sock"
cleanup() {
    "$BIN/hearth" --host "unix://$sock" rm -f demo >/dev/null 2>&1 || true
    [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$BIN/hearthd" --root "$work/root" --socket "$sock" --init-binary "$HEARTH_INIT" 2>"$work/hearthd.log" &
daemon=$!
i=0; while [ ! -S "$sock" ]; do i=$((i+1)); [ $i -gt 300 ] && { cat "$work/hearthd.log"; exit 1; }; sleep 0.05; done
h() { "$BIN/hearth" --host "unix://$sock" "$@"; }

echo "==> importing the guest kernel $(basename "$KERNEL")"
h kernel import "$KERNEL" --modules "$MODULES" --name debian --default

echo "==> building a busybox image locally"
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc"
cp /bin/busybox "$work/rootfs/bin/busybox"
for a in sh echo cat uname ls id hostname; do ln -s busybox "$work/rootfs/bin/$a"; done
echo "root:x:0:0:root:/root:/bin/sh" > "$work/rootfs/etc/passwd"
tar -C "$work/rootfs" -cf "$work/demo.tar" .
h image import "$work/demo.tar" --name demo:latest

echo "==> hearth run --rm demo:latest sh -c '...'"
h run --rm --name demo demo:latest sh -c 'echo "Hello from a hearth microVM!"; echo "kernel $(uname -r), hostname $(hostname), $(grep -c ^processor /proc/cpuinfo) vCPU"'
echo "==> the VM exited with code $?"
