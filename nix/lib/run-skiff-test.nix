# runSkiffTest: the arguments of nixpkgs' runNixOSTest that matter for a
# headless run, turned into the JSON test description `skiff test` reads
# (driver/src/description.rs: one format, one meaning) and a derivation
# `vm-test-run-<name>` that runs it, needing the `kvm` and `nixos-test`
# system features as upstream's does.
#
# A node is either raw (an attribute set with `kernel`: kernel, initrd,
# cmdline, cpus, memory, disks, vlans, display, extraArgs, connectTimeout)
# or a NixOS module (anything else), evaluated with the caller's nixpkgs and
# ./modules/skiff-guest.nix, which makes a raw node of it.
#
# Invariants:
# - Node numbers, MACs and addresses come from ./network.nix, the same
#   rules the driver applies; the description carries the numbers and MACs
#   and the driver refuses one whose numbers differ from its own.
# - Everything is checked at evaluation, with a message that names the node
#   and the attribute; nothing invalid reaches a build.
# - Without nixpkgs (`pkgs = null`) only builtins and /bin/sh are used, so
#   the description can be evaluated and tested with any Nix from 2.8 on.
{ system, pkgs, skiff }:
let
  network = import ./network.nix;
  inherit (import ./write.nix { inherit system; }) writeText;

  fail = msg: throw "runSkiffTest: ${msg}";

  # The arguments accepted, as runNixOSTest names them.
  knownArgs = [
    "name" "nodes" "testScript" "globalTimeout" "extraPythonPackages"
    "skipLint" "skipTypeCheck" "defaults" "meta" "passthru"
  ];
  rawAttrs = [
    "kernel" "initrd" "cmdline" "cpus" "memory" "disks" "vlans" "display"
    "extraArgs" "connectTimeout"
  ];
  diskAttrs = [ "path" "readonly" "overlay" "id" ];

  unknown = known: attrs: builtins.filter (a: !(builtins.elem a known)) (builtins.attrNames attrs);
  commas = builtins.concatStringsSep ", ";

  isRaw = node: builtins.isAttrs node && node ? kernel;

  # A file a node boots or reads: a path (copied to the store), a
  # derivation, or an absolute path as a string (outside the store: the
  # build must then run unsandboxed, as /dev/kvm needs anyway).
  filePath = where: p:
    if builtins.isPath p then "${p}"
    else if builtins.isAttrs p && p ? outPath then "${p}"
    else if builtins.isString p && (builtins.substring 0 1 p == "/" || builtins.substring 0 2 p == "\${") then p
    else fail "${where}: expected a path, a derivation or an absolute path, got ${if builtins.isString p then builtins.toJSON p else "a ${builtins.typeOf p}"}";

  checkInt = where: lo: hi: v:
    if !(builtins.isInt v) then fail "${where} must be an integer, got a ${builtins.typeOf v}"
    else if v < lo || v > hi then fail "${where} ${toString v} is out of range (${toString lo} to ${toString hi})"
    else v;

  checkBool = where: v:
    if builtins.isBool v then v else fail "${where} must be true or false, got a ${builtins.typeOf v}";

  disk = node: i: d:
    let
      where = "node \"${node}\": disks[${toString i}]";
      attrs = if builtins.isAttrs d && !(d ? outPath) then d else { path = d; };
      extra = unknown diskAttrs attrs;
    in
    if extra != [ ] then fail "${where}: unknown attribute ${builtins.head extra} (a disk takes ${commas diskAttrs})"
    else if !(attrs ? path) then fail "${where}: missing path"
    else if (attrs.readonly or false) && (attrs.overlay or false) then fail "${where}: readonly and overlay exclude each other (an overlay is writable)"
    else { path = filePath "${where}.path" attrs.path; }
      // (if attrs ? readonly then { readonly = checkBool "${where}.readonly" attrs.readonly; } else { })
      // (if attrs ? overlay then { overlay = checkBool "${where}.overlay" attrs.overlay; } else { })
      // (if attrs ? id then { inherit (attrs) id; } else { });

  # A raw node's attributes, checked, with the driver's defaults made
  # explicit; `vlans` stays as given (the network plan checks it).
  checkRaw = name: n:
    let
      where = "node \"${name}\"";
      extra = unknown rawAttrs n;
      disks = n.disks or [ ];
    in
    if extra != [ ] then
      fail "${where}: unknown attribute ${builtins.head extra} (a raw node takes ${commas rawAttrs}; anything else makes it a NixOS module, which needs no kernel)"
    else if !(builtins.isList disks) then fail "${where}: disks must be a list"
    else {
      kernel = filePath "${where}: kernel" n.kernel;
      cmdline = if builtins.isString (n.cmdline or "") then n.cmdline or "" else fail "${where}: cmdline must be a string";
      cpus = checkInt "${where}: cpus" 1 254 (n.cpus or 1);
      memory = checkInt "${where}: memory" 64 1048576 (n.memory or 1024);
      disks = builtins.genList (i: disk name i (builtins.elemAt disks i)) (builtins.length disks);
      vlans = n.vlans or [ 1 ];
    }
    // (if n ? initrd then { initrd = filePath "${where}: initrd" n.initrd; } else { })
    // (if n ? display then {
      display =
        if builtins.isBool n.display then n.display
        else if builtins.isAttrs n.display && builtins.attrNames n.display == [ "height" "width" ] then {
          width = checkInt "${where}: display.width" 320 4095 n.display.width;
          height = checkInt "${where}: display.height" 200 4095 n.display.height;
        }
        else fail "${where}: display must be true, false or { width; height; }";
    } else { })
    // (if n ? extraArgs then {
      extra_args = if builtins.isList n.extraArgs && builtins.all builtins.isString n.extraArgs
        then n.extraArgs else fail "${where}: extraArgs must be a list of strings";
    } else { })
    // (if n ? connectTimeout then { connect_timeout = checkInt "${where}: connectTimeout" 1 86400 n.connectTimeout; } else { });

  nixosNode = import ../nixos-node.nix;
in
args:
let
  extraArgs = unknown knownArgs args;
  name =
    if !(args ? name) then fail "missing name"
    else if builtins.match "[A-Za-z0-9._-]+" args.name == null then fail "name ${builtins.toJSON args.name} must use only letters, digits, '-', '_' and '.'"
    else args.name;
  nodesArg =
    if !(args ? nodes) then fail "test \"${name}\": missing nodes"
    else if !(builtins.isAttrs args.nodes) || args.nodes == { } then fail "test \"${name}\": nodes must be a non-empty attribute set of nodes"
    else args.nodes;

  # Module nodes become raw nodes through the guest module; `evaluated`
  # keeps their NixOS configurations for the script function.
  evaluated = builtins.mapAttrs
    (n: node:
      if isRaw node then null
      else if pkgs == null then
        fail "node \"${n}\" is a NixOS module (it has no kernel attribute), which needs nixpkgs: import Skiff's nix/ with { pkgs = import <nixpkgs> { }; }"
      else nixosNode {
        inherit pkgs system plan;
        name = n;
        module = node;
        defaults = args.defaults or { };
      })
    nodesArg;
  rawNodes = builtins.mapAttrs
    (n: node: checkRaw n (if isRaw node then node else evaluated.${n}.config.system.build.skiffNode))
    nodesArg;

  plan = network.plan (builtins.mapAttrs (n: r: r.vlans) rawNodes);

  # What the script function sees: a NixOS node's configuration, or a raw
  # node with its number and interfaces.
  scriptNodes = builtins.mapAttrs
    (n: node:
      if isRaw node then rawNodes.${n} // { inherit (plan.nodes.${n}) number interfaces; }
      else evaluated.${n}.config)
    nodesArg;
  script =
    let s = args.testScript or (fail "test \"${name}\": missing testScript");
    in if builtins.isFunction s then s { nodes = scriptNodes; }
    else if builtins.isString s then s
    else fail "test \"${name}\": testScript must be a string or a function of { nodes, ... }";

  globalTimeout = checkInt "test \"${name}\": globalTimeout" 1 604800 (args.globalTimeout or 3600);

  description = {
    inherit name script;
    global_timeout = globalTimeout;
    nodes = builtins.mapAttrs
      (n: r: r // {
        inherit (plan.nodes.${n}) number;
        vlans = plan.nodes.${n}.vlans;
        macs = map (i: i.mac) plan.nodes.${n}.interfaces;
      })
      rawNodes;
  };

  pythonPackages = args.extraPythonPackages or (_: [ ]);
  pythonPath =
    let wanted = pythonPackages (if pkgs == null then { } else pkgs.python3.pkgs);
    in
    if wanted == [ ] then null
    else if pkgs == null then fail "test \"${name}\": extraPythonPackages needs nixpkgs (pkgs), to build the packages for the driver's Python"
    else "${pkgs.python3.withPackages (_: wanted)}/${pkgs.python3.sitePackages}";

  descriptionFile = writeText "${name}-description.json" (builtins.toJSON description);

  skiffBin =
    if skiff == null then fail "test \"${name}\": no skiff to run it: import Skiff's nix/ with { pkgs = ...; } (to build it) or { skiff = \"/path/to/skiff\"; }"
    else if builtins.isString skiff && builtins.substring 0 1 skiff == "/" then skiff
    else "${skiff}/bin/skiff";

  env = if pythonPath == null then "" else "export PYTHONPATH=${pythonPath}\n";

  # Upstream's vm-test-run-<name>: logs, junit.xml and events.jsonl and
  # the files copy_from_vm copied are the output; a failed test fails the
  # build. Snapshots are not cached across builds (--no-snapshot).
  test = derivation {
    name = "vm-test-run-${name}";
    inherit system;
    builder = "/bin/sh";
    requiredSystemFeatures = [ "kvm" "nixos-test" ];
    description = descriptionFile;
    skiff = skiffBin;
    args = [
      "-c"
      ''
        set -e
        export HOME="$TMPDIR"
        ${env}"$skiff" test --no-snapshot --output-dir "$out" "$description"
      ''
    ];
  };

  # The same test by hand: `result/bin/skiff-test-driver` opens the
  # driver's REPL (--interactive) with the machines defined.
  driverInteractive = derivation {
    name = "skiff-test-driver-${name}";
    inherit system;
    builder = "/bin/sh";
    description = descriptionFile;
    skiff = skiffBin;
    args = [
      "-c"
      ''
        set -e
        /bin/mkdir -p "$out/bin"
        printf '#!/bin/sh\n${env}exec "%s" test --interactive "%s" "$@"\n' "$skiff" "$description" > "$out/bin/skiff-test-driver"
        /bin/chmod +x "$out/bin/skiff-test-driver"
      ''
    ];
  };
in
if extraArgs != [ ] then
  fail "test ${builtins.toJSON (args.name or "?")}: unknown argument ${builtins.head extraArgs} (runSkiffTest takes ${commas knownArgs})"
else
  test // {
    inherit description descriptionFile driverInteractive;
    nodes = scriptNodes;
    passthru = args.passthru or { };
    meta = args.meta or { };
  }
