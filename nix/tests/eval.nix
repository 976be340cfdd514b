# Evaluation tests of runSkiffTest with raw nodes, builtins only (Debian's
# Nix 2.8, no nixpkgs). Each attribute of `descriptions` is the JSON
# description a test emits, compared with nix/tests/golden/<name>.json by
# tests/tests/nix.rs; each attribute of `bad` must fail evaluation with the
# message that test expects.
let
  s = import ../. { system = "x86_64-linux"; skiff = "/opt/skiff/bin/skiff"; };
  node = {
    kernel = "/fixtures/vmlinuz";
    initrd = "/fixtures/initrd.cpio.gz";
    cmdline = "panic=-1 skiff.action=backdoor";
  };
  t = args: s.runSkiffTest ({ testScript = "start_all()\n"; } // args);
in
{
  descriptions = {
    one = (t {
      name = "one";
      nodes.machine = node // { memory = 256; };
      testScript = "machine.succeed('true')\n";
    }).description;

    # Two nodes on VLAN 1; the script is a function of the nodes.
    two = (t {
      name = "two";
      globalTimeout = 600;
      nodes = {
        server = node // { disks = [{ path = "/fixtures/rootfs.ext4"; overlay = true; id = "root"; }]; };
        client = node // { cpus = 2; };
      };
      testScript = { nodes, ... }: ''
        start_all()
        client.succeed("ping -c 1 ${(builtins.head nodes.server.interfaces).ipv4}")
        assert ${toString nodes.client.number} == 1
      '';
    }).description;

    # Three nodes on two VLANs joined by a router; names out of order.
    three = (t {
      name = "router";
      nodes = {
        server = node // { vlans = [ 2 ]; };
        router = node // { vlans = [ 1 2 ]; memory = 512; display = true; };
        client = node // { vlans = [ 1 ]; extraArgs = [ "--serial=stdio" ]; connectTimeout = 120; };
      };
    }).description;
  };

  # The same test's derivations: name, features, outputs.
  derivation = let d = t { name = "one"; nodes.machine = node; }; in {
    inherit (d) name requiredSystemFeatures;
    driver = d.driverInteractive.name;
    description = d.descriptionFile.name;
  };

  bad = {
    unknownNodeAttribute = (t { name = "bad"; nodes.machine = node // { memroy = 512; }; }).description;
    vlanOutOfRange = (t { name = "bad"; nodes.machine = node // { vlans = [ 256 ]; }; }).description;
    vlanZero = (t { name = "bad"; nodes = { a = node; b = node // { vlans = [ 0 ]; }; }; }).description;
    vlanTwice = (t { name = "bad"; nodes.machine = node // { vlans = [ 3 3 ]; }; }).description;
    unknownArgument = (t { name = "bad"; nodes.machine = node; enableOCR = true; }).description;
    moduleWithoutNixpkgs = (t { name = "bad"; nodes.machine = { services.nginx.enable = true; }; }).description;
    relativeKernel = (t { name = "bad"; nodes.machine = node // { kernel = "vmlinuz"; }; }).description;
    memoryType = (t { name = "bad"; nodes.machine = node // { memory = "1G"; }; }).description;
    badDisk = (t { name = "bad"; nodes.machine = node // { disks = [{ path = "/d"; readonly = true; overlay = true; }]; }; }).description;
    badName = (t { name = "a b"; nodes.machine = node; }).description;
    noNodes = (t { name = "bad"; nodes = { }; }).description;
  };
}
