# A web server and a client on one VLAN, in the style of nixpkgs'
# nixos/tests/nginx.nix: the client reaches the server by name, loses it
# while the server's card is unplugged (block), and gets it back (unblock).
start_all()
server.wait_for_unit("nginx.service")
server.wait_for_open_port(80)
client.wait_for_unit("multi-user.target")

with subtest("the NixOS network conventions"):
    # Nodes sorted by name, numbered from 1: client 1, server 2; VLAN 1.
    assert client.succeed("hostname").strip() == "client"
    assert "192.168.1.2/24" in server.succeed("ip -4 addr show eth1")
    assert "2001:db8:1::2/64" in server.succeed("ip -6 addr show eth1")
    assert "52:54:00:12:01:02" in server.succeed("cat /sys/class/net/eth1/address")
    client.succeed("grep -E '^192\\.168\\.1\\.2[[:space:]]+server$' /etc/hosts")
    client.succeed("ping -c 1 -W 5 server")
    client.succeed("ping -6 -c 1 -W 5 2001:db8:1::2")

with subtest("the client fetches the welcome page"):
    page = client.succeed("curl --fail --silent --max-time 20 http://server/")
    assert "Welcome to nginx" in page, page

with subtest("block and unblock"):
    server.block()
    client.fail("curl --fail --silent --max-time 5 http://server/")
    server.unblock()
    client.wait_until_succeeds("curl --fail --silent --max-time 5 http://server/", timeout=60)
