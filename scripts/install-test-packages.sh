#!/usr/bin/env bash
# Install the Debian/Ubuntu packages warmvm's tests need (README, "Requirements"), so that
# `scripts/test` is the whole set-up on a fresh machine with Rust, gcc and /dev/kvm.
#
# Says what it installs. Does nothing when everything is there. As root it installs what is
# missing with apt-get (QEMU 10 from bookworm-backports on Debian 12, whose own QEMU 7.2 has
# no cpr-transfer); otherwise it names what is missing in one line and exits non-zero.
set -euo pipefail

log() { echo "install-test-packages: $*" >&2; }
die() { log "$*"; exit 1; }

# One line each: the package, and what needs it.
packages=(
    curl            # the README's API examples, run as written; bench cache reads /stats
    binutils        # objdump, for the guest's register check
    util-linux      # setpriv, for the permission tests
    mount           # the snapshot tests mount a small tmpfs as a full disk
    xz-utils zstd lz4 gzip  # unpacking the cloud kernel
    strace          # a test kills a VMM as it enters its Nth sendmsg
    prometheus      # promtool check metrics, on the live metrics
    python3 python3-venv  # Schemathesis, for the API contract test
    iproute2        # ip netns, ip tuntap: the network tests' own namespaces
    wrk httperf coreutils  # bench cache's loads (stdbuf line-buffers httperf)
    netbase         # /etc/services: wrk looks up the port of an http:// URL there
    fonts-dejavu-core  # the text of bench aging's plots
    acpica-tools    # iasl -d disassembles the ACPI tables built for Linux guests
    systemd         # systemd-analyze verify checks contrib/warmvm.service (nothing is started)
    protobuf-compiler  # protoc: the etcd client's gRPC code is generated when warmvm builds
    etcd-server etcd-client  # the fleet tests' etcd members, and etcdctl to look at them
)

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# QEMU 10 or newer: the peer of `warmvm bench reboot` needs cpr-transfer.
qemu_ok() {
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
    [ -n "$v" ] && [ "$v" -ge 10 ]
}

command -v dpkg-query >/dev/null || die "not a Debian or Ubuntu system: install by hand: ${packages[*]} qemu-system-x86 (10 or newer)"

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
need_qemu=""
qemu_ok || need_qemu=1

if [ ${#missing[@]} -eq 0 ] && [ -z "$need_qemu" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    want="${missing[*]}${need_qemu:+ qemu-system-x86 (10 or newer)}"
    die "missing packages: ${want# }; run scripts/test as root once to install them"
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || die "apt-get update failed"
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi
if [ -n "$need_qemu" ]; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$codename" = bookworm ]; then
        list=/etc/apt/sources.list.d/bookworm-backports.list
        if ! apt-cache policy qemu-system-x86 | grep -q bookworm-backports; then
            log "adding bookworm-backports ($list) for QEMU 10"
            echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$list"
            apt-get update -qq >&2 || die "apt-get update failed"
        fi
        log "installing qemu-system-x86 from bookworm-backports"
        apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null \
            || die "apt-get install -t bookworm-backports qemu-system-x86 failed"
    else
        log "installing qemu-system-x86"
        apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null \
            || die "apt-get install qemu-system-x86 failed"
    fi
    qemu_ok || die "qemu-system-x86_64 is older than 10 here: the QEMU peer needs cpr-transfer (QEMU 10)"
fi
