# A shallow evaluation of nix/modules/skiff-guest.nix with builtins only:
# a stand-in for the parts of nixpkgs' lib the module uses (options with
# defaults, mkDefault/mkOverride with priorities, types as names) and for
# the packages it names (fake derivations that are never built). It checks
# what the module sets and how it derives the node from its options; it does
# NOT check the result against NixOS's real option declarations and types,
# which needs nixpkgs (README, "Using Skiff from Nix").
#
#   nix-instantiate --eval --strict --json nix/tests/module.nix -A options
#   nix-instantiate --eval --strict --json nix/tests/module.nix -A values
let
  system = "x86_64-linux";
  fake = name: derivation { inherit name system; builder = "/bin/sh"; args = [ "-c" "exit 1" ]; };

  lib = {
    mkOption = attrs: attrs // { _type = "option"; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkDefault = content: lib.mkOverride 1000 content;
    types = {
      str = "str";
      bool = "bool";
      unspecified = "unspecified";
      ints = { positive = "positive int"; unsigned = "unsigned int"; };
      listOf = t: "list of ${t}";
      attrsOf = t: "attribute set of ${t}";
    };
    concatMapStrings = f: list: builtins.concatStringsSep "" (map f list);
  };
  pkgs = {
    inherit system;
    bash = fake "bash";
    bashInteractive = fake "bash-interactive";
    coreutils = fake "coreutils";
    erofs-utils = fake "erofs-utils";
    closureInfo = { rootPaths }: fake "closure-info";
    callPackage = f: args: fake "kernel";
    linuxPackagesFor = kernel: { inherit kernel; };
  };

  isProperty = v: builtins.isAttrs v && v ? _type && v._type == "override";
  isOption = v: builtins.isAttrs v && v ? _type && v._type == "option";
  isLeaf = v: !(builtins.isAttrs v) || v ? outPath || v ? _type;

  # Definitions with their priorities: { value; priority; } per leaf.
  strip = v:
    if isProperty v then { value = (strip v.content).value; priority = v.priority; }
    else { value = v; priority = 100; };

  # Merge `defs` (a list of definition trees) leaf by leaf: the lowest
  # priority number wins; two different values at the same priority are a
  # conflict, as in nixpkgs; lists of equal priority are concatenated.
  mergeDefs = path: defs:
    let
      attrDefs = builtins.filter (d: builtins.isAttrs d && !(isLeaf d)) defs;
    in
    if defs != [ ] && builtins.length attrDefs == builtins.length defs then
      let names = builtins.attrNames (builtins.foldl' (a: d: a // d) { } defs);
      in builtins.listToAttrs (map
        (n: {
          name = n;
          value = mergeDefs (path ++ [ n ])
            (map (d: d.${n}) (builtins.filter (d: d ? ${n}) defs));
        })
        names)
    else
      let
        stripped = map strip defs;
        best = builtins.foldl' (m: d: if d.priority < m then d.priority else m) 9999 stripped;
        winners = map (d: d.value) (builtins.filter (d: d.priority == best) stripped);
        first = builtins.head winners;
      in
      if builtins.all builtins.isList winners then builtins.concatLists winners
      else if builtins.all (w: w == first) winners then first
      else throw "conflicting definitions of ${builtins.concatStringsSep "." path}";

  # The defaults declared in `options`, as a definition tree of priority 1500.
  defaults = opts:
    if isOption opts then (if opts ? default then lib.mkOverride 1500 opts.default else null)
    else builtins.mapAttrs (n: defaults) opts;
  dropNulls = t:
    if isLeaf t then t
    else builtins.mapAttrs (n: dropNulls)
      (builtins.removeAttrs t (builtins.filter (n: t.${n} == null) (builtins.attrNames t)));

  network = import ../lib/network.nix;
  plan = network.plan { client = [ 1 ]; server = [ 1 2 ]; };

  # What runSkiffTest and NixOS would set, plus a test's own module.
  given = {
    skiff = { name = "server"; inherit plan; };
    virtualisation = { vlans = [ 1 2 ]; memorySize = 512; graphics = true; };
    system.build.toplevel = fake "nixos-system-server";
    nix.package.out = fake "nix";
    boot.kernelParams = [ "quiet" ];
  };

  module = import ../modules/skiff-guest.nix;
  result = module { inherit config lib pkgs; };
  config = mergeDefs [ ] [ (dropNulls (defaults result.options)) result.config given ];

  # Every option path the module's config sets, to its leaves.
  paths = prefix: t:
    if isLeaf t then [ (builtins.concatStringsSep "." prefix) ]
    else builtins.concatLists (map (n: paths (prefix ++ [ n ]) t.${n}) (builtins.attrNames t));

  # Store paths without their hashes, so the golden values do not change
  # with every edit of a file that goes into a derivation.
  storeHash = s: builtins.concatStringsSep "<store>/"
    (builtins.filter builtins.isString (builtins.split "${builtins.storeDir}/[0-9a-z]{32}-" s));
in
{
  options = paths [ ] result.config;
  declared = paths [ ] result.options;
  values = {
    inherit (config.networking) hostName extraHosts interfaces;
    inherit (config.services.udev) extraRules;
    kernelParams = config.boot.kernelParams;
    inherit (config) fileSystems;
    node = builtins.mapAttrs (n: v: if builtins.isString v then storeHash v else v)
      (config.system.build.skiffNode // {
        disks = map (d: d // { path = storeHash d.path; }) config.system.build.skiffNode.disks;
      });
    rootPassword = config.users.users.root.hashedPassword;
    vmPanicOnOom = config.boot.kernel.sysctl."vm.panic_on_oom";
  };
}
