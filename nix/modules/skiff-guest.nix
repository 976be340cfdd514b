# The NixOS module for Skiff guests: what qemu-vm.nix and
# test-instrumentation.nix do for a QEMU test VM, for skiff-vmm.
#
# - `virtualisation.{memorySize, cores, vlans, graphics, resolution,
#   diskSize}` with the upstream names and defaults; runSkiffTest reads them
#   into the node's description (`system.build.skiffNode`).
# - The backdoor: a root shell on /dev/hvc0 after the upstream banner
#   `Spawning backdoor root shell...`; the kernel log and journal on ttyS0.
# - eth1.. one per VLAN, renamed by MAC (52:54:00:12:<vlan>:<node>), with
#   192.168.<vlan>.<node>/24 and 2001:db8:<vlan>::<node>/64, and every node
#   in /etc/hosts, as nixos/lib/testing/network.nix does.
# - The store: a read-only erofs image of the node's closure on a
#   virtio-blk disk (serial `nix-store`, /dev/disk/by-id/virtio-nix-store),
#   under a tmpfs overlay at /nix/store; the registration loaded at boot.
#   Snapshots capture it, which a host-shared store would not allow.
# - `/` is a tmpfs (a `mkDefault`), diskSize MiB large.
#
# No `with lib;`: `nix-instantiate --parse` then reports any undefined name.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkDefault mkOverride types;
  cfg = config.virtualisation;
  skiff = config.skiff;

  # This node's cards, as the test's plan numbers them.
  cards = skiff.plan.nodes.${skiff.name}.interfaces;

  regInfo = pkgs.closureInfo { rootPaths = [ config.system.build.toplevel ]; };
  storeImage = import ../lib/store-image.nix { inherit (pkgs) system; } {
    name = "${skiff.name}-nix-store";
    roots = [ config.system.build.toplevel regInfo ];
    sh = "${pkgs.bash}/bin/sh";
    mkfsErofs = "${pkgs.erofs-utils}/bin/mkfs.erofs";
    cp = "${pkgs.coreutils}/bin/cp";
    mkdir = "${pkgs.coreutils}/bin/mkdir";
  };
in
{
  options = {
    skiff = {
      name = mkOption {
        type = types.str;
        description = "The node's name in the test (set by runSkiffTest).";
      };
      plan = mkOption {
        type = types.unspecified;
        internal = true;
        description = "The test's network plan from nix/lib/network.nix (set by runSkiffTest).";
      };
    };
    virtualisation = {
      memorySize = mkOption {
        type = types.ints.positive;
        default = 1024;
        description = "Guest memory in MiB.";
      };
      cores = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "Number of vCPUs.";
      };
      vlans = mkOption {
        type = types.listOf types.ints.unsigned;
        default = [ 1 ];
        description = "VLANs the node is on: eth1 on the first, eth2 on the second, ...";
      };
      diskSize = mkOption {
        type = types.ints.positive;
        default = 1024;
        description = "Size of the writable root in MiB (a tmpfs under Skiff; an ext4 image under QEMU).";
      };
      graphics = mkOption {
        type = types.bool;
        default = false;
        description = "A screen (virtio-gpu), keyboard and tablet.";
      };
      resolution = mkOption {
        type = types.attrsOf types.ints.positive;
        default = { x = 1024; y = 768; };
        description = "The screen's mode.";
      };
    };
  };

  config = {
    boot.kernelPackages = mkDefault (pkgs.linuxPackagesFor (pkgs.callPackage ../kernel.nix { }));
    boot.loader.grub.enable = false;
    boot.initrd.availableKernelModules = [ "virtio_mmio" "virtio_blk" "virtio_net" "virtio_console" "virtio_rng" "erofs" "overlay" ];
    boot.initrd.kernelModules = [ "virtio_console" "virtio_gpu" ];
    boot.consoleLogLevel = 7;
    boot.kernelParams = [ "console=ttyS0" "panic=1" "boot.panic_on_fail" ];
    boot.postBootCommands = ''
      if [[ "$(cat /proc/cmdline)" =~ regInfo=([^ ]*) ]]; then
        ${config.nix.package.out}/bin/nix-store --load-db < ''${BASH_REMATCH[1]}
      fi
    '';

    fileSystems = {
      "/" = mkDefault {
        device = "tmpfs";
        fsType = "tmpfs";
        options = [ "mode=0755" "size=${toString cfg.diskSize}M" ];
      };
      "/nix/.ro-store" = {
        device = "/dev/disk/by-id/virtio-nix-store";
        fsType = "erofs";
        options = [ "ro" ];
        neededForBoot = true;
      };
      "/nix/.rw-store" = {
        device = "tmpfs";
        fsType = "tmpfs";
        options = [ "mode=0755" ];
        neededForBoot = true;
      };
      "/nix/store" = {
        overlay = {
          lowerdir = [ "/nix/.ro-store" ];
          upperdir = "/nix/.rw-store/upper";
          workdir = "/nix/.rw-store/work";
        };
        neededForBoot = true;
      };
    };

    systemd.services.backdoor = {
      wantedBy = [ "multi-user.target" ];
      requires = [ "dev-hvc0.device" "dev-ttyS0.device" ];
      after = [ "dev-hvc0.device" "dev-ttyS0.device" ];
      script = ''
        export USER=root
        export HOME=/root
        export DISPLAY=:0.0
        if [[ -e /etc/profile ]]; then
          source /etc/profile
        fi
        export PAGER=
        cd /tmp
        exec < /dev/hvc0 > /dev/hvc0
        while ! exec 2> /dev/ttyS0; do sleep 0.1; done
        echo "connecting to host..." >&2
        stty -F /dev/hvc0 raw -echo
        echo "Spawning backdoor root shell..."
        PS1="" exec ${pkgs.bashInteractive}/bin/bash --norc /dev/hvc0
      '';
      serviceConfig.KillSignal = "SIGHUP";
    };
    systemd.services."serial-getty@ttyS0".enable = false;
    systemd.services."serial-getty@hvc0".enable = false;
    services.journald.extraConfig = ''
      ForwardToConsole=yes
      TTYPath=/dev/ttyS0
      MaxLevelConsole=debug
    '';
    systemd.settings.Manager = {
      ShowStatus = false;
      DefaultTimeoutStartSec = 300;
      DefaultDeviceTimeoutSec = 300;
    };
    boot.kernel.sysctl = {
      "kernel.hung_task_timeout_secs" = 600;
      "vm.panic_on_oom" = mkDefault 2;
    };
    users.users.root.hashedPassword = mkOverride 150 "";
    services.logrotate.enable = false;

    networking.hostName = mkDefault skiff.name;
    networking.usePredictableInterfaceNames = false;
    networking.defaultGateway = mkOverride 150 null;
    networking.nameservers = mkOverride 150 [ ];
    networking.interfaces = builtins.listToAttrs (map
      (c: {
        inherit (c) name;
        value = {
          ipv4.addresses = [{ address = c.ipv4; prefixLength = 24; }];
          ipv6.addresses = [{ address = c.ipv6; prefixLength = 64; }];
        };
      })
      cards);
    networking.extraHosts = lib.concatMapStrings (h: "${h.address} ${h.name}\n") skiff.plan.hosts;
    services.udev.extraRules = lib.concatMapStrings
      (c: ''ACTION=="add", SUBSYSTEM=="net", ATTR{address}=="${c.mac}", NAME="${c.name}"
      '')
      cards;

    # What runSkiffTest boots: the description's raw node.
    system.build.skiffNode = {
      kernel = "${config.system.build.toplevel}/kernel";
      initrd = "${config.system.build.toplevel}/initrd";
      cmdline = "${toString config.boot.kernelParams} init=${config.system.build.toplevel}/init regInfo=${regInfo}/registration";
      cpus = cfg.cores;
      memory = cfg.memorySize;
      vlans = cfg.vlans;
      disks = [{ path = "${storeImage}/store.erofs"; readonly = true; id = "nix-store"; }];
    } // (if cfg.graphics then { display = { width = cfg.resolution.x; height = cfg.resolution.y; }; } else { });
  };
}
