# Skiff from Nix. With nixpkgs:
#
#   let skiff = import ./nix { pkgs = import <nixpkgs> { }; };
#   in skiff.runSkiffTest { name = "web"; nodes = { ... }; testScript = "..."; }
#
# builds skiff itself and takes NixOS modules as nodes. Without nixpkgs
# (`pkgs = null`, the default) only raw nodes work and `skiff` must name a
# skiff binary; everything then needs only builtins and /bin/sh, which is
# how the project's own tests check it with Debian's Nix 2.8.
{ system ? builtins.currentSystem
, pkgs ? null
  # The skiff package (with bin/skiff and bin/skiff-vmm), or the absolute
  # path of a skiff binary with skiff-vmm beside it.
, skiff ? (if pkgs == null then null else pkgs.callPackage ./package.nix { })
}:
{
  runSkiffTest = import ./lib/run-skiff-test.nix { inherit system pkgs skiff; };
  network = import ./lib/network.nix;
  inherit (import ./lib/write.nix { inherit system; }) writeText;
  storeImage = import ./lib/store-image.nix { inherit system; };
  nixosModules.skiff-guest = import ./modules/skiff-guest.nix;
  package = skiff;
}
// (if pkgs == null then { } else {
  kernel = pkgs.callPackage ./kernel.nix { };
})
