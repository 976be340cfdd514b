{
  description = "Skiff: fast, headless NixOS-style VM tests on a Rust microVM monitor";

  # No inputs: the caller brings nixpkgs. With it:
  #   (skiff.lib.withPkgs pkgs).runSkiffTest { name; nodes; testScript; }
  # Without it (raw nodes, a skiff binary given by path):
  #   (skiff.lib.forSystemWith "x86_64-linux" "/path/to/skiff").runSkiffTest { ... }
  outputs = { self }: {
    lib = {
      withPkgs = pkgs: import ./nix { inherit pkgs; system = pkgs.stdenv.hostPlatform.system; };
      forSystem = system: import ./nix { inherit system; };
      forSystemWith = system: skiff: import ./nix { inherit system skiff; };
    };
    nixosModules.skiff-guest = import ./nix/modules/skiff-guest.nix;
  };
}
