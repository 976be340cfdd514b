#!/bin/sh
# Tests tests/guest/net-config (the guests' network configuration from the
# kernel command line) without a VM:
#  - against a fake sysfs, procfs and /etc, with a stand-in `ip` that logs
#    its arguments, renames the fake cards and refuses to rename a card that
#    is up; under each POSIX shell at hand (sh, dash, bash, busybox sh);
#  - where network namespaces are allowed (root, or unprivileged user
#    namespaces) and veth cards can be made: for real, with iproute2's and
#    busybox's `ip`, including name resolution through /etc/hosts and
#    /etc/gai.conf. Skipped with a note otherwise.
# Prints a line per check; exits 1 at the first failure.
set -u

here="$(cd "$(dirname "$0")" && pwd)"
script="$here/net-config"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT INT TERM

A=52:54:00:12:01:01
B=52:54:00:12:02:01
C=52:54:00:12:09:09

die() {
    echo "FAIL: $*"
    for f in out err ip.log; do
        [ -f "$fake/$f" ] && { echo "--- $f"; cat "$fake/$f"; }
    done
    exit 1
}
ok() { echo "ok: $*"; }

# expect WHAT EXPECTED ACTUAL
expect() {
    [ "$2" = "$3" ] || die "$1: expected
$2
--- got
$3"
}

# expect_has WHAT NEEDLE TEXT
expect_has() {
    case "$3" in *"$2"*) ;; *) die "$1: no '$2' in
$3" ;; esac
}

# The stand-in ip.
cat > "$tmp/ip" <<'EOF'
#!/bin/sh
# Stand-in for ip in tests/guest/net-config-test.sh: logs its arguments to
# $FAKE/ip.log and acts on the fake sysfs and procfs under $FAKE.
echo "ip $*" >> "$FAKE/ip.log"
net="$FAKE/sys/class/net"
case "$*" in
    "link set dev "*" name "*)
        [ -d "$net/$4" ] || { echo "Cannot find device \"$4\"" >&2; exit 1; }
        [ "$(cat "$net/$4/operstate")" = down ] \
            || { echo "RTNETLINK answers: Device or resource busy" >&2; exit 2; }
        [ ! -e "$net/$6" ] || { echo "RTNETLINK answers: File exists" >&2; exit 2; }
        mv "$net/$4" "$net/$6"
        mv "$FAKE/proc/sys/net/ipv6/conf/$4" "$FAKE/proc/sys/net/ipv6/conf/$6"
        ;;
    "link set dev "*" up"|"link set dev "*" down")
        [ -d "$net/$4" ] || { echo "Cannot find device \"$4\"" >&2; exit 1; }
        echo "$5" > "$net/$4/operstate"
        ;;
    *" dev "*)
        for dev; do :; done
        [ -d "$net/$dev" ] || { echo "Cannot find device \"$dev\"" >&2; exit 1; }
        ;;
esac
EOF
chmod +x "$tmp/ip"

fake="$tmp/fake"
# fake_cards NAME=MAC[:up]...: a fresh fake sysfs, procfs and /etc with those
# cards (down unless :up).
fake_cards() {
    rm -rf "$fake"
    mkdir -p "$fake/sys/class/net" "$fake/proc/sys/kernel" \
        "$fake/proc/sys/net/ipv6/conf/all" "$fake/etc"
    echo skiff > "$fake/proc/sys/kernel/hostname"
    echo 1 > "$fake/proc/sys/net/ipv6/conf/all/accept_dad"
    echo "original hosts" > "$fake/etc/hosts"
    : > "$fake/ip.log"
    add_card lo=00:00:00:00:00:00
    for c; do
        add_card "$c"
    done
}
add_card() {
    name="${1%%=*}"; mac="${1#*=}"; state=down
    case "$mac" in *:up) mac="${mac%:up}"; state=up ;; esac
    conf="$fake/proc/sys/net/ipv6/conf/$name"
    mkdir -p "$fake/sys/class/net/$name" "$conf"
    echo "$state" > "$fake/sys/class/net/$name/operstate"
    echo 1 > "$conf/accept_dad"
    echo 1 > "$conf/accept_ra"
    echo 3 > "$conf/router_solicitations"
    # Last: the script looks for the address.
    echo "$mac" > "$fake/sys/class/net/$name/address"
}

# run CMDLINE [WAIT]: net-config under $sh in the fake environment; $rc,
# $out, $err, $log.
run() {
    printf '%s\n' "$1" > "$fake/cmdline"
    # shellcheck disable=SC2086 # $sh may be "busybox sh"
    FAKE="$fake" SKIFF_NET_CMDLINE="$fake/cmdline" SKIFF_NET_SYS="$fake/sys" \
        SKIFF_NET_PROC="$fake/proc" SKIFF_NET_ETC="$fake/etc" SKIFF_NET_IP="$tmp/ip" \
        SKIFF_NET_WAIT="${2:-0}" $sh "$script" > "$fake/out" 2> "$fake/err"
    rc=$?
    out="$(cat "$fake/out")"
    err="$(cat "$fake/err")"
    log="$(cat "$fake/ip.log")"
}

# card NAME: "MAC operstate accept_dad accept_ra router_solicitations"
card() {
    conf="$fake/proc/sys/net/ipv6/conf/$1"
    echo "$(cat "$fake/sys/class/net/$1/address") $(cat "$fake/sys/class/net/$1/operstate")" \
        "$(cat "$conf/accept_dad") $(cat "$conf/accept_ra") $(cat "$conf/router_solicitations")"
}
cards() { (cd "$fake/sys/class/net" && echo *); }

fake_tests() {
    # Today's command lines: nothing happens, nothing is printed.
    fake_cards "eth0=$A"
    run "console=ttyS0 panic=-1 root=/dev/vda rw skiff.action=backdoor"
    expect "no parameters: status" 0 "$rc"
    expect "no parameters: output" "" "$out$err$log"
    expect "no parameters: hostname" skiff "$(cat "$fake/proc/sys/kernel/hostname")"
    expect "no parameters: hosts" "original hosts" "$(cat "$fake/etc/hosts")"
    [ ! -e "$fake/etc/gai.conf" ] || die "no parameters: gai.conf written"
    expect "no parameters: cards" "eth0 lo" "$(cards)"
    ok "$sh: no parameters, nothing done"

    # A router on two VLANs whose cards hold each other's target names.
    fake_cards "eth1=$B" "eth2=$A"
    run "panic=-1 skiff.hostname=router skiff.ip=$A,192.168.1.2/24,2001:db8:1::2/64 skiff.ip=$B,192.168.2.2/24,2001:db8:2::2/64 skiff.hosts=client@1.1,router@1.2,router@2.2,server@2.3"
    expect "two cards: status" 0 "$rc"
    expect "two cards: stderr" "" "$err"
    expect "two cards: ip commands" "ip link set dev lo up
ip link set dev eth2 down
ip link set dev eth2 name skiffnet1
ip link set dev eth1 down
ip link set dev eth1 name skiffnet2
ip link set dev skiffnet1 name eth1
ip link set dev skiffnet2 name eth2
ip addr replace 192.168.1.2/24 dev eth1
ip -6 addr replace 2001:db8:1::2/64 dev eth1
ip link set dev eth1 up
ip addr replace 192.168.2.2/24 dev eth2
ip -6 addr replace 2001:db8:2::2/64 dev eth2
ip link set dev eth2 up" "$log"
    expect "two cards: names" "eth1 eth2 lo" "$(cards)"
    expect "two cards: eth1" "$A up 0 0 0" "$(card eth1)"
    expect "two cards: eth2" "$B up 0 0 0" "$(card eth2)"
    expect "two cards: all/accept_dad" 0 "$(cat "$fake/proc/sys/net/ipv6/conf/all/accept_dad")"
    expect "two cards: hostname" router "$(cat "$fake/proc/sys/kernel/hostname")"
    expect "two cards: /etc/hosts" "127.0.0.1 localhost
::1 localhost
192.168.1.1 client
2001:db8:1::1 client
192.168.1.2 router
2001:db8:1::2 router
192.168.2.2 router
2001:db8:2::2 router
192.168.2.3 server
2001:db8:2::3 server" "$(cat "$fake/etc/hosts")"
    expect_has "two cards: gai.conf" "precedence ::ffff:0:0/96 100" "$(cat "$fake/etc/gai.conf")"
    expect "two cards: output" "skiff-net-config: hostname router
skiff-net-config: eth1 ($A) up: 192.168.1.2/24 2001:db8:1::2/64
skiff-net-config: eth2 ($B) up: 192.168.2.2/24 2001:db8:2::2/64
skiff-net-config: $fake/etc/hosts: 4 names" "$out"
    ok "$sh: two cards swap names, hostname, /etc/hosts"

    # A card without skiff.ip= holds the target name; the MAC is given in
    # upper case; the host name is not among the hosts.
    fake_cards "eth0=$A" "eth1=$C"
    run "skiff.hostname=lonely skiff.ip=$(echo "$A" | tr a-f A-F),192.168.1.5/24,2001:db8:1::5/64 skiff.hosts=server@1.2"
    expect "occupied name: status" 0 "$rc"
    expect "occupied name: ip commands" "ip link set dev lo up
ip link set dev eth0 down
ip link set dev eth0 name skiffnet1
ip link set dev eth1 down
ip link set dev eth1 name eth2
ip link set dev skiffnet1 name eth1
ip addr replace 192.168.1.5/24 dev eth1
ip -6 addr replace 2001:db8:1::5/64 dev eth1
ip link set dev eth1 up" "$log"
    expect "occupied name: eth1" "$A up 0 0 0" "$(card eth1)"
    expect "occupied name: eth2" "$C down 1 1 3" "$(card eth2)"
    expect "occupied name: /etc/hosts" "127.0.0.1 localhost
::1 localhost
192.168.1.2 server
2001:db8:1::2 server
127.0.1.1 lonely" "$(cat "$fake/etc/hosts")"
    ok "$sh: a card without skiff.ip= moves out of eth1's way"

    # Run again (a card already named and up): addresses only.
    fake_cards "eth1=$A:up"
    run "skiff.ip=$A,192.168.1.2/24,2001:db8:1::2/64"
    expect "configured: status" 0 "$rc"
    expect "configured: ip commands" "ip link set dev lo up
ip addr replace 192.168.1.2/24 dev eth1
ip -6 addr replace 2001:db8:1::2/64 dev eth1
ip link set dev eth1 up" "$log"
    expect "configured: hosts untouched" "original hosts" "$(cat "$fake/etc/hosts")"
    ok "$sh: a card already named eth1 keeps its name"

    # Malformed parameters: each reported, the rest applied, status 1.
    fake_cards "eth0=$A" "eth1=$B"
    run "skiff.hostname=bad_name! skiff.ip=nonsense skiff.ip=$A,192.168.1.2/24,2001:db8:1::2/64 skiff.ip=$B,192.168.300.2/24,2001:db8:2::2/64 skiff.ip=52:54:00:99:99:99,192.168.3.2/24,2001:db8:3::2/64 skiff.ip=$A,192.168.4.2/24,2001:db8:4::2/64 skiff.ip=$B,192.168.5.2/24 skiff.ip=$B,192.168.5.2/24,2001:db8:5::2/64,x skiff.ip=* skiff.ip=\$(touch\${IFS}$fake/pwned) skiff.hosts=server@1.2,@1.3,x@1,y@1.255,z@01.2,ok@3.4,web_1@3.5"
    expect "malformed: status" 1 "$rc"
    for needle in "skiff.hostname=bad_name!: not a host name" \
        "skiff.ip=nonsense (card 1): expected MAC,IPV4/LEN,IPV6/LEN" \
        "skiff.ip=$B,192.168.300.2/24,2001:db8:2::2/64 (card 3): expected" \
        "no network card with MAC 52:54:00:99:99:99 (card 4) after 0 s; eth4 is not configured (cards: eth0 eth1 lo)" \
        "(card 5): MAC $A is card 2's too" \
        "skiff.ip=$B,192.168.5.2/24 (card 6): expected" \
        "(card 7): expected" "skiff.ip=* (card 8): expected" \
        "skiff.ip=\$(touch\${IFS}$fake/pwned) (card 9): expected" \
        "skiff.hosts entry @1.3: expected NAME@VLAN.NODE" \
        "skiff.hosts entry x@1: expected" "skiff.hosts entry y@1.255: expected" \
        "skiff.hosts entry z@01.2: expected"; do
        expect_has "malformed: message" "$needle" "$err"
    done
    [ ! -e "$fake/pwned" ] || die "malformed: a parameter was run as a command"
    expect "malformed: message count" 13 "$(echo "$err" | grep -c '^skiff-net-config: error: ')"
    expect "malformed: ip commands" "ip link set dev lo up
ip link set dev eth0 down
ip link set dev eth0 name skiffnet2
ip link set dev skiffnet2 name eth2
ip addr replace 192.168.1.2/24 dev eth2
ip -6 addr replace 2001:db8:1::2/64 dev eth2
ip link set dev eth2 up" "$log"
    expect "malformed: hostname" skiff "$(cat "$fake/proc/sys/kernel/hostname")"
    expect "malformed: /etc/hosts" "127.0.0.1 localhost
::1 localhost
192.168.1.2 server
2001:db8:1::2 server
192.168.3.4 ok
2001:db8:3::4 ok
192.168.3.5 web_1
2001:db8:3::5 web_1" "$(cat "$fake/etc/hosts")"
    ok "$sh: malformed parameters reported one by one, the rest applied"

    # A card that appears late is waited for.
    fake_cards
    (sleep 0.3; add_card "eth0=$A") &
    run "skiff.ip=$A,192.168.1.2/24,2001:db8:1::2/64" 5
    wait
    expect "late card: status" 0 "$rc"
    expect "late card: eth1" "$A up 0 0 0" "$(card eth1)"
    ok "$sh: a card that appears late is waited for"
}

shells="sh"
for s in dash bash; do
    command -v "$s" >/dev/null && shells="$shells $s"
done
command -v busybox >/dev/null && shells="$shells busybox_sh"
for s in $shells; do
    sh="$(echo "$s" | tr _ ' ')"
    fake_tests
done

# The same for real, in network, mount and UTS namespaces: veth cards with
# the MACs, a sysfs of that network namespace, /etc/hosts and /etc/gai.conf
# replaced by bind mounts.
if [ "$(id -u)" = 0 ]; then
    ns="unshare -n -m -u" priv=1
else
    ns="unshare -r -n -m -u" priv=0
fi
cat > "$tmp/netns" <<'EOF'
# In the namespaces: $1 the shell, $2 the ip command, $3 the script, $4 1
# if the namespaces' root is the real root.
set -eu
sh="$1"; ipc="$2"; script="$3"; tmp="$(dirname "$0")"
proc=/proc
if [ "$4" = 0 ]; then
    # From a user namespace kernel.hostname cannot be written through /proc:
    # the host name goes to a file, the rest to this namespace's /proc/sys/net.
    proc="$tmp/proc"
    mkdir -p "$proc/sys/kernel"
    ln -sfn /proc/sys/net "$proc/sys/net"
    echo skiff > "$proc/sys/kernel/hostname"
fi
mount -t sysfs sysfs /sys
ip link add eth0 address 52:54:00:12:02:01 type veth peer name peer0
ip link add eth1 address 52:54:00:12:01:01 type veth peer name peer1
ip link set peer0 up
ip link set peer1 up
etc="$tmp/etc"
mkdir -p "$etc"
echo "original" > "$etc/hosts"
echo "original" > "$etc/gai.conf"
resolve=
if [ -f /etc/hosts ] && [ -f /etc/gai.conf ] && command -v getent >/dev/null; then
    mount --bind "$etc/hosts" /etc/hosts
    mount --bind "$etc/gai.conf" /etc/gai.conf
    etc=/etc
    resolve=1
fi
echo "skiff.hostname=router skiff.ip=52:54:00:12:01:01,192.168.1.2/24,2001:db8:1::2/64 skiff.ip=52:54:00:12:02:01,192.168.2.2/24,2001:db8:2::2/64 skiff.hosts=client@1.1,router@1.2,router@2.2,server@2.3" > "$tmp/cmdline"
# shellcheck disable=SC2086
SKIFF_NET_CMDLINE="$tmp/cmdline" SKIFF_NET_PROC="$proc" SKIFF_NET_ETC="$etc" \
    SKIFF_NET_IP="$ipc" $sh "$script"
fail() { echo "FAIL: $*"; ip addr; exit 1; }
[ "$(cat /sys/class/net/eth1/address)" = 52:54:00:12:01:01 ] || fail "eth1's MAC"
[ "$(cat /sys/class/net/eth2/address)" = 52:54:00:12:02:01 ] || fail "eth2's MAC"
[ ! -e /sys/class/net/eth0 ] || fail "eth0 is left"
for c in "eth1 1" "eth2 2"; do
    set -- $c
    a="$(ip -o addr show dev "$1")"
    case "$a" in *"inet 192.168.$2.2/24 "*) ;; *) fail "$1: no 192.168.$2.2/24" ;; esac
    case "$a" in *"inet6 2001:db8:$2::2/64 "*) ;; *) fail "$1: no 2001:db8:$2::2/64" ;; esac
    case "$a" in *tentative*) fail "$1: a tentative address" ;; esac
    case "$(ip -o link show dev "$1")" in *"<"*UP*">"*) ;; *) fail "$1 is not up" ;; esac
    [ "$(cat /proc/sys/net/ipv6/conf/$1/accept_dad)" = 0 ] || fail "$1: accept_dad"
    [ "$(cat /proc/sys/net/ipv6/conf/$1/router_solicitations)" = 0 ] || fail "$1: router_solicitations"
done
[ "$(cat "$proc/sys/kernel/hostname")" = router ] || fail "hostname"
grep -qx '192.168.2.3 server' "$etc/hosts" || fail "/etc/hosts"
if [ -n "$resolve" ]; then
    first="$(getent ahosts server | head -n1 | cut -d' ' -f1)"
    [ "$first" = 192.168.2.3 ] || fail "server resolves to $first first, not 192.168.2.3"
    echo "resolved"
fi
EOF
variants="sh|ip"
command -v busybox >/dev/null && variants="$variants busybox_sh|busybox_ip"
if ! command -v ip >/dev/null; then
    echo "skip: network namespace checks (no iproute2 ip)"
elif ! $ns sh -c 'ip link add probe0 type veth peer name probe1 && mount -t sysfs sysfs /sys' \
    >/dev/null 2>&1; then
    echo "skip: network namespace checks (no network namespace with veth and sysfs here)"
else
    for v in $variants; do
        sh="$(echo "${v%|*}" | tr _ ' ')"
        ipc="$(echo "${v#*|}" | tr _ ' ')"
        res="$($ns sh "$tmp/netns" "$sh" "$ipc" "$script" "$priv" 2>&1)" \
            || { echo "$res"; echo "FAIL: network namespace, $sh with $ipc"; exit 1; }
        case "$res" in
            *resolved*) ok "$sh with $ipc: veth cards renamed and up, addresses not tentative, server resolves to IPv4 first" ;;
            *) ok "$sh with $ipc: veth cards renamed and up, addresses not tentative (name resolution not checked)" ;;
        esac
    done
fi
echo "all passed"
