# One NixOS module node of a runSkiffTest test: the caller's nixpkgs
# evaluates it with the Skiff guest module, the test's `defaults` and the
# node's place in the test network; the guest module's
# `system.build.skiffNode` is then the raw node the description holds.
{ pkgs, system, plan, name, module, defaults }:
import "${pkgs.path}/nixos/lib/eval-config.nix" {
  inherit system;
  modules = [
    ./modules/skiff-guest.nix
    defaults
    module
    {
      nixpkgs.pkgs = pkgs;
      skiff = { inherit name plan; };
    }
  ];
}
