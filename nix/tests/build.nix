# A real build of a runSkiffTest test with raw nodes from the project's
# guest fixtures: two busybox nodes on VLAN 1, the network checked both
# ways, and a store image built here (a program, its interpreter and its
# data, by closure) attached to the server as a read-only disk and mounted
# as /nix/store under a tmpfs overlay, as the guest module does for NixOS
# nodes (the busybox guest stands in for NixOS, which cannot be built
# here).
#
#   nix-build nix/tests/build.nix --argstr guest ~/.cache/skiff/guest \
#     --argstr skiff "$PWD/target/debug/skiff"
#
# Needs /dev/kvm for standard guests (the build runs them), the sandbox off
# (the fixtures and skiff are host paths) and, as root, `build-users-group =`
# (/dev/kvm is 0600 on Debian).
{ system ? builtins.currentSystem, guest, skiff }:
let
  s = import ../. { inherit system skiff; };
  inherit (s) writeText;

  # A store path that depends on two others: the image must hold all three.
  busybox = derivation {
    name = "busybox-static";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "/bin/mkdir -p $out/bin && /bin/cp /bin/busybox $out/bin/busybox" ];
  };
  greeting = writeText "greeting" "hello from the store";
  hello = derivation {
    name = "skiff-store-hello";
    inherit system;
    builder = "/bin/sh";
    args = [
      "-c"
      ''
        /bin/mkdir -p $out/bin
        printf '#!${busybox}/bin/busybox sh\nexec ${busybox}/bin/busybox cat ${greeting}\n' > $out/bin/hello
        /bin/chmod +x $out/bin/hello
      ''
    ];
  };
  image = s.storeImage { name = "hello-nix-store"; roots = [ hello ]; };

  node = {
    kernel = "${guest}/vmlinuz-microvm";
    initrd = "${guest}/initrd.cpio.gz";
    cmdline = "panic=-1 skiff.action=backdoor";
    memory = 256;
  };
in
s.runSkiffTest {
  name = "nix-two-nodes";
  nodes = {
    client = node;
    server = node // {
      disks = [{ path = "${image}/store.erofs"; readonly = true; id = "nix-store"; }];
    };
  };
  globalTimeout = 1200;
  testScript = { nodes, ... }:
    let
      serverIp = (builtins.head nodes.server.interfaces).ipv4;
      clientIp = (builtins.head nodes.client.interfaces).ipv4;
    in
    ''
      start_all()
      with subtest("the nodes reach each other on VLAN 1"):
          client.succeed("ping -c 1 -W 5 ${serverIp}")
          server.succeed("ping -c 1 -W 5 ${clientIp}")

      with subtest("the store image is /nix/store, under a writable overlay"):
          dev = server.succeed(
              "for b in /sys/block/vd*; do [ \"$(cat $b/serial)\" = nix-store ] && basename $b; done; true"
          ).strip()
          server.succeed(
              "mkdir -p /nix/.ro-store /nix/.rw-store /nix/store"
              f" && mount -t erofs -o ro /dev/{dev} /nix/.ro-store"
              " && mount -t tmpfs tmpfs /nix/.rw-store"
              " && mkdir /nix/.rw-store/upper /nix/.rw-store/work"
              " && mount -t overlay overlay -o lowerdir=/nix/.ro-store,"
              "upperdir=/nix/.rw-store/upper,workdir=/nix/.rw-store/work /nix/store"
          )
          assert server.succeed("${hello}/bin/hello") == "hello from the store\n"
          server.succeed("test -x ${busybox}/bin/busybox && test -f ${greeting}")
          server.succeed("echo w > /nix/store/written && test -f /nix/.rw-store/upper/written")
          server.fail("touch /nix/.ro-store/written")
    '';
}
