# skiff and skiff-vmm, built from this repository with nixpkgs' Rust
# tooling. The driver embeds Python (pyo3), so the package links the same
# python3 that extraPythonPackages builds for. Tests are not run here: most
# need /dev/kvm (the derivation `runSkiffTest` builds does).
{ lib, rustPlatform, python3, pkg-config }:
rustPlatform.buildRustPackage {
  pname = "skiff";
  version = "0.1.0";
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path;
      in !(type == "directory" && (base == "target" || base == ".git"));
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "-p" "skiff-driver" "-p" "skiff-vmm" ];
  nativeBuildInputs = [ pkg-config python3 ];
  buildInputs = [ python3 ];
  PYO3_PYTHON = "${python3}/bin/python3";
  doCheck = false;
  meta = {
    description = "Fast, headless NixOS-style VM tests on a Rust microVM monitor";
    mainProgram = "skiff";
    platforms = [ "x86_64-linux" ];
  };
}
