# The test network, numbered as NixOS numbers it (nixos/lib/testing/
# network.nix) and as the driver checks it (driver/src/network.rs): nodes
# from 1 in name order, VLANs 1 to 255, card k of a node on the k-th VLAN of
# its list as eth<k>, with MAC 52:54:00:12:<vlan>:<node> (hex) and the
# addresses 192.168.<vlan>.<node>/24 and 2001:db8:<vlan>::<node>/64.
# Builtins only, so it evaluates with any Nix from 2.8 on and no nixpkgs.
let
  hexDigits = "0123456789abcdef";
  hex2 = n: builtins.substring (n / 16) 1 hexDigits + builtins.substring (n - (n / 16) * 16) 1 hexDigits;

  maxNodes = 254;
  maxVlan = 255;

  imap1 = f: list: builtins.genList (i: f (i + 1) (builtins.elemAt list i)) (builtins.length list);

  checkVlans = node: vlans:
    let
      bad = builtins.filter (v: !(builtins.isInt v) || v < 1 || v > maxVlan) vlans;
      twice = builtins.filter (v: builtins.length (builtins.filter (w: w == v) vlans) > 1) vlans;
    in
    if !(builtins.isList vlans) then
      throw "runSkiffTest: node \"${node}\": vlans must be a list of VLAN numbers, got a ${builtins.typeOf vlans}"
    else if bad != [ ] then
      throw "runSkiffTest: node \"${node}\": VLAN ${builtins.toJSON (builtins.head bad)} is out of range (VLAN numbers are 1 to ${toString maxVlan})"
    else if twice != [ ] then
      throw "runSkiffTest: node \"${node}\": VLAN ${toString (builtins.head twice)} is listed twice in vlans"
    else vlans;
in
rec {
  inherit hex2 maxNodes maxVlan;

  mac = vlan: node: "52:54:00:12:${hex2 vlan}:${hex2 node}";
  ipv4 = vlan: node: "192.168.${toString vlan}.${toString node}";
  ipv6 = vlan: node: "2001:db8:${toString vlan}::${toString node}";

  # { <node name> = [ vlan ... ]; } -> { <node name> = { number; interfaces; hosts... }; }
  plan = vlansOf:
    let
      names = builtins.attrNames vlansOf;
      count = builtins.length names;
      numbered = imap1
        (number: name:
          let vlans = checkVlans name vlansOf.${name};
          in {
            inherit name number vlans;
            interfaces = imap1
              (k: vlan: {
                name = "eth${toString k}";
                inherit vlan;
                mac = mac vlan number;
                ipv4 = ipv4 vlan number;
                ipv6 = ipv6 vlan number;
              })
              vlans;
          })
        names;
      nodes = builtins.listToAttrs (map (n: { inherit (n) name; value = n; }) numbered);
    in
    if count > maxNodes then
      throw "runSkiffTest: the test has ${toString count} nodes, more than ${toString maxNodes}: node numbers are the last byte of 192.168.<vlan>.<node>"
    else {
      inherit nodes;
      # Every VLAN some node is on, ascending, once.
      vlans = builtins.sort builtins.lessThan
        (builtins.attrValues (builtins.listToAttrs (map
          (v: { name = toString v; value = v; })
          (builtins.concatLists (map (n: n.vlans) numbered)))));
      # /etc/hosts: each node with a VLAN at its first address, in name order.
      hosts = builtins.concatLists (map
        (n:
          if n.interfaces == [ ] then [ ]
          else [
            { inherit (n) name; address = (builtins.head n.interfaces).ipv4; }
            { inherit (n) name; address = (builtins.head n.interfaces).ipv6; }
          ])
        numbered);
    };
}
