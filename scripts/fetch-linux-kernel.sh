#!/usr/bin/env bash
# Provide a real Linux kernel for warmvm's Linux boot tests:
#   target/linux/vmlinuz  copy of Debian's cloud kernel (a bzImage)
#   target/linux/vmlinux  the ELF kernel inside it (has a PVH entry note)
#
# Installs linux-image-cloud-amd64 (and the decompressor its payload needs) with apt-get when
# missing, so it needs root the first time. Idempotent: when both files are present and match
# the installed kernel it does nothing. Set LINUX_KERNEL=/path/to/bzImage to use another
# kernel instead of the newest /boot/vmlinuz-*-cloud-amd64.
#
# For its own test (crates/warmvm/tests/fetch_kernel.rs) the places it reads and writes can be
# moved: WARMVM_BOOT_DIR (default /boot) and WARMVM_LINUX_OUT (default target/linux).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${WARMVM_LINUX_OUT:-$root/target/linux}"
boot="${WARMVM_BOOT_DIR:-/boot}"

die() { echo "fetch-linux-kernel: $*" >&2; exit 1; }
log() { echo "fetch-linux-kernel: $*" >&2; }

apt_updated=""
apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to install $* (apt-get install -y $*)"
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    if [ -z "$apt_updated" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
}

# The newest cloud kernel in $boot, or nothing. A glob rather than `ls`: with no match, `ls`
# fails, and under `set -o pipefail` that failure would end the script before the install.
newest_cloud_kernel() {
    local k
    for k in "$boot"/vmlinuz-*-cloud-amd64; do
        if [ -f "$k" ]; then printf '%s\n' "$k"; fi
    done | sort -V | tail -n 1
}

kernel="${LINUX_KERNEL:-}"
if [ -z "$kernel" ]; then
    kernel="$(newest_cloud_kernel)"
    if [ -z "$kernel" ]; then
        log "installing linux-image-cloud-amd64"
        apt_install linux-image-cloud-amd64
        kernel="$(newest_cloud_kernel)"
        [ -n "$kernel" ] || die "linux-image-cloud-amd64 installed no $boot/vmlinuz-*-cloud-amd64"
    fi
fi
[ -r "$kernel" ] || die "cannot read kernel $kernel"

is_elf() { [ -f "$1" ] && [ "$(od -An -N4 -tx1 "$1" | tr -d ' \n')" = "7f454c46" ]; }

if [ -f "$out/vmlinuz" ] && cmp -s "$kernel" "$out/vmlinuz" && is_elf "$out/vmlinux"; then
    log "up to date: $out/vmlinux (from $kernel)"
    exit 0
fi

# Little-endian unsigned integer of $2 bytes at offset $1 of the kernel.
le() { od -An -j "$1" -N "$2" -tu"$2" "$kernel" | tr -d ' \n'; }

[ "$(dd if="$kernel" bs=1 skip=514 count=4 status=none)" = "HdrS" ] \
    || die "$kernel is not a bzImage (no HdrS header)"
version=$(le $((0x206)) 2)
[ "$version" -ge $((0x208)) ] || die "$kernel uses boot protocol $(printf %#x "$version"); 2.08+ is needed to find the payload"
setup_sects=$(le $((0x1f1)) 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset=$(le $((0x248)) 4)
payload_length=$(le $((0x24c)) 4)
start=$(( (setup_sects + 1) * 512 + payload_offset ))
[ "$payload_length" -gt 8 ] || die "$kernel has an empty payload"

# The first $1 bytes of the payload (GNU dd: byte offsets, no partial reads to worry about).
payload() { dd if="$kernel" iflag=skip_bytes,count_bytes skip="$start" count="$1" bs=1M status=none; }
magic="$(payload 6 | od -An -tx1 | tr -d ' \n')"
# Every compressor but gzip gets the uncompressed size appended (4 bytes): drop it.
trimmed=$((payload_length - 4))
case "$magic" in
    1f8b*)         tool=gzip;  pkg=gzip;      cmd=(gzip -dc);  trimmed=$payload_length ;;
    fd377a585a00*) tool=xz;    pkg=xz-utils;  cmd=(xz -dc) ;;
    02214c18*)     tool=lz4;   pkg=lz4;       cmd=(lz4 -dc) ;;
    28b52ffd*)     tool=zstd;  pkg=zstd;      cmd=(zstd -dcq) ;;
    425a68*)       tool=bzip2; pkg=bzip2;     cmd=(bzip2 -dc) ;;
    5d0000*)       tool=lzma;  pkg=xz-utils;  cmd=(xz -dc --format=lzma) ;;
    7f454c46*)     tool=cat;   pkg=coreutils; cmd=(cat); trimmed=$payload_length ;;
    *) die "unknown payload compression in $kernel (magic $magic)" ;;
esac
command -v "$tool" >/dev/null || { log "installing $pkg for the $tool payload"; apt_install "$pkg"; }

mkdir -p "$out"
tmp="$out/.vmlinux.$$"
trap 'rm -f "$tmp" "$out/.vmlinuz.$$"' EXIT
payload "$trimmed" | "${cmd[@]}" >"$tmp" || die "$tool failed to decompress the payload of $kernel"
is_elf "$tmp" || die "the payload of $kernel did not decompress to an ELF"
cp "$kernel" "$out/.vmlinuz.$$"
mv "$out/.vmlinuz.$$" "$out/vmlinuz"
mv "$tmp" "$out/vmlinux"
log "wrote $out/vmlinuz and $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes, $tool payload) from $kernel"
