#!/usr/bin/env bash
# Installs what tandem's build, tests and demo need on Debian 12, and nothing else.
# Idempotent: a machine that already has everything does no network access at all
# (each package is checked with dpkg-query first; `apt-get update` runs only when
# something is missing). Needs root (or sudo) only when something must be installed.
set -euo pipefail

# Debian packages and why:
#   fio            the workload generator of the tests and benchmarks (its nbd engine)
#   qemu-utils     qemu-img convert/compare through NBD. Always install it together with
#                  anything qemu: installing qemu-system-x86 alone can remove a newer
#                  qemu-utils through a version conflict.
#   libnbd-bin     nbdinfo/nbdcopy; python3-libnbd: nbdsh (the raw NBD read/write checks)
#   nbdkit         a reference NBD server (harness self-tests, benchmark baseline)
#   tshark         Wireshark's DRBD dissector, an independent check of the wire format
#   tcpdump        captures tandem's replication traffic for tshark
#   iperf3         loopback TCP baseline for the benchmarks
#   drbd-utils     drbdmeta, the reference that reads and writes tandem's DRBD 9 metadata
#                  in the interop tests (tests/tests/drbdmeta.rs)
#   build-essential, pkg-config   C toolchain for crates that build C code
#   e2fsprogs      mkfs.ext4: the ko-count test freezes (fsfreeze) an ext4 loop mount
PACKAGES=(fio qemu-utils libnbd-bin python3-libnbd nbdkit tshark tcpdump iperf3
          drbd-utils build-essential pkg-config e2fsprogs)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]} > 0)); then
    echo "install-deps: installing ${missing[*]}" >&2
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            echo "install-deps: missing packages (${missing[*]}) and not root; run as root" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    # tshark's package asks whether non-root users may capture; answer it up front.
    echo "wireshark-common wireshark-common/install-setuid boolean false" |
        "${SUDO[@]}" debconf-set-selections
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}"
fi

# The programs themselves, in case a package is installed but broken or shadowed.
for tool in fio qemu-img nbdsh nbdinfo nbdkit tshark tcpdump iperf3 drbdmeta cc pkg-config; do
    if ! command -v "$tool" >/dev/null 2>&1 && [[ ! -x /usr/bin/$tool && ! -x /usr/sbin/$tool ]]; then
        echo "install-deps: \`$tool\` is still missing after installing packages" >&2
        exit 1
    fi
done

# Rust: only package registries are reachable here, so a toolchain cannot be fetched.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found. A Rust toolchain >= 1.85 (cargo, rustc, rustfmt," >&2
    echo "clippy) is required and cannot be downloaded from here; install it with rustup" >&2
    echo "on a machine that can, or put its bin directory on PATH." >&2
    exit 1
fi
rustc_version=$(rustc --version | awk '{print $2}')
if ! printf '1.85.0\n%s\n' "${rustc_version%%-*}" | sort -V -C; then
    echo "install-deps: rustc $rustc_version is too old; tandem needs Rust >= 1.85" >&2
    exit 1
fi
