# Shared helpers for the guest-fixture and test-host scripts (sourced, not run).
# shellcheck shell=bash

SKIFF_CACHE="${SKIFF_CACHE:-$HOME/.cache/skiff}"
export SKIFF_CACHE

skiff_log() { echo "[$(date +%H:%M:%S)] ${SKIFF_LOG_PREFIX:-skiff}: $*" >&2; }
skiff_die() { skiff_log "error: $*"; exit 1; }

# Prints the name of Debian's current generic 6.1 kernel package, e.g.
# linux-image-6.1.0-48-amd64 (SKIFF_DEBIAN_KERNEL_PACKAGE overrides).
debian_kernel_package() {
    if [ -n "${SKIFF_DEBIAN_KERNEL_PACKAGE:-}" ]; then
        echo "$SKIFF_DEBIAN_KERNEL_PACKAGE"
        return
    fi
    local pkg
    pkg="$(apt-cache show linux-image-amd64 2>/dev/null \
        | sed -n 's/^Depends:.*\(linux-image-6\.1\.0-[0-9]*-amd64\).*/\1/p' | head -n1)"
    if [ -z "$pkg" ]; then
        pkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null \
            | awk '{print $1}' | sort -V | tail -n1)"
    fi
    [ -n "$pkg" ] || skiff_die "no linux-image-6.1.0-*-amd64 package known to apt (run apt-get update)"
    echo "$pkg"
}

# Unpacks Debian's stock kernel into $SKIFF_CACHE/debian/<package>_<version>/ once
# (vmlinuz, root/lib/modules/<release>, release) and prints that directory.
debian_kernel_prepare() {
    local pkg version dir tmp deb release
    pkg="$(debian_kernel_package)"
    version="$(apt-cache show "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
    dir="$SKIFF_CACHE/debian/${pkg}_${version:-unknown}"
    if [ -f "$dir/.done" ]; then
        echo "$dir"
        return
    fi
    skiff_log "fetching $pkg ${version} from Debian"
    tmp="$(mktemp -d "${SKIFF_CACHE}/.debian.XXXXXX")"
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>"$tmp/apt.log") \
        || { cat "$tmp/apt.log" >&2; rm -rf "$tmp"; skiff_die "apt-get download $pkg failed"; }
    deb="$(ls "$tmp"/*.deb)"
    mkdir -p "$tmp/root"
    dpkg -x "$deb" "$tmp/root"
    release="$(ls "$tmp/root/lib/modules")"
    # The package ships no modules.dep: build it.
    depmod -b "$tmp/root" "$release"
    cp "$tmp/root/boot/vmlinuz-$release" "$tmp/vmlinuz"
    echo "$release" > "$tmp/release"
    rm -rf "$tmp/root/boot" "$tmp/root/usr" "$deb" "$tmp/apt.log"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    mv "$tmp" "$dir"
    touch "$dir/.done"
    echo "$dir"
}

# Prints, in load order, the module files (relative to lib/modules/<release>)
# that the given modules need, dependencies first, each once.
debian_module_closure() {
    local kdir="$1"; shift
    local release
    release="$(cat "$kdir/release")"
    modprobe -d "$kdir/root" -S "$release" --show-depends -a "$@" \
        | awk '$1 == "insmod" {print $2}' \
        | sed "s#^$kdir/root/lib/modules/$release/##" \
        | awk '!seen[$0]++'
}

# make_busybox_initrd OUT INIT KDIR MODULE...
# Builds a gzip'd cpio initrd: busybox (static) with its applets linked,
# bash (static, when SKIFF_INITRD_BASH names it) as /bin/bash, INIT
# as /init, the given Debian modules and their dependencies under
# /lib/modules/<release> (with a fresh modules.dep) and /etc/modules.order
# listing them in load order.
make_busybox_initrd() {
    local out="$1" init="$2" kdir="$3"; shift 3
    local busybox root release m
    busybox="$(command -v busybox || true)"
    [ -n "$busybox" ] || skiff_die "busybox not found (apt-get install busybox-static)"
    root="$(mktemp -d)"
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,root,lib/modules}
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    # The kernel runs /sbin/modprobe itself (request_module), e.g. for the
    # crypto algorithms a module asks for.
    ln -sf ../bin/busybox "$root/sbin/modprobe"
    if [ -n "${SKIFF_INITRD_BASH:-}" ]; then
        install -m 0755 "$SKIFF_INITRD_BASH" "$root/bin/bash"
    fi
    install -m 0755 "$init" "$root/init"
    if [ -n "$kdir" ] && [ $# -gt 0 ]; then
        release="$(cat "$kdir/release")"
        mkdir -p "$root/lib/modules/$release"
        debian_module_closure "$kdir" "$@" > "$root/etc/modules.order"
        while read -r m; do
            mkdir -p "$root/lib/modules/$release/$(dirname "$m")"
            cp "$kdir/root/lib/modules/$release/$m" "$root/lib/modules/$release/$m"
        done < "$root/etc/modules.order"
        cp "$kdir/root/lib/modules/$release"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$release/" 2>/dev/null || true
        depmod -b "$root" "$release"
    fi
    mkdir -p "$(dirname "$out")"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible 2>/dev/null \
        || find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -6 > "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$root"
}

# Prints a sha256 over the given files' contents and any extra words.
inputs_key() {
    { for f in "$@"; do if [ -f "$f" ]; then sha256sum < "$f"; else echo "$f"; fi; done; } \
        | sha256sum | cut -c1-16
}
