# The microVM guest kernel for NixOS nodes: Linux 6.1 with
# kernel-config/microvm.config on top of allnoconfig (what the project's
# own fixture kernel is), plus ./kernel-nixos.config, what NixOS's stage 1
# and systemd need beyond it (modules, for the initrd's module closure).
# Everything skiff-vmm offers is built in. Needs nixpkgs; reading the
# generated configuration is an import from derivation.
{ stdenv, linuxManualConfig, linux_6_1, flex, bison, perl, bc }:
let
  configfile = stdenv.mkDerivation {
    pname = "skiff-microvm-kernel-config";
    inherit (linux_6_1) version src;
    nativeBuildInputs = [ flex bison perl bc ];
    dontConfigure = true;
    buildPhase = ''
      runHook preBuild
      make allnoconfig
      scripts/kconfig/merge_config.sh -m .config ${../kernel-config/microvm.config} ${./kernel-nixos.config}
      make olddefconfig
      # Every option asked for must have survived Kconfig's dependencies.
      for f in ${../kernel-config/microvm.config} ${./kernel-nixos.config}; do
        grep '^CONFIG_' "$f" | while IFS= read -r line; do
          grep -qxF "$line" .config || { echo "kernel config: $line did not survive olddefconfig" >&2; exit 1; }
        done
      done
      runHook postBuild
    '';
    installPhase = "cp .config $out";
  };
in
linuxManualConfig {
  inherit (linux_6_1) src version modDirVersion;
  inherit configfile;
  allowImportFromDerivation = true;
}
