# Two VLANs joined by a router: client (VLAN 1, 192.168.1.1) and server
# (VLAN 2, 192.168.2.3) reach each other only through the router
# (192.168.1.2 and 192.168.2.2), and stop when it stops forwarding.
start_all()
for m in machines:
    m.wait_for_unit("multi-user.target")
server.wait_for_unit("nginx.service")

with subtest("no way across without the router's routes"):
    client.fail("ping -c 1 -W 2 192.168.2.3")
    client.succeed("ip route add 192.168.2.0/24 via 192.168.1.2")
    server.succeed("ip route add 192.168.1.0/24 via 192.168.2.2")
    router.succeed("sysctl -w net.ipv4.ip_forward=1")

with subtest("ping and TCP through the router"):
    client.succeed("ping -c 3 -W 5 192.168.2.3")
    server.succeed("ping -c 3 -W 5 192.168.1.1")
    # 8 MiB through the router, checked end to end.
    server.succeed("head -c 8388608 /dev/urandom > /var/www/html/blob")
    want = server.succeed("sha256sum < /var/www/html/blob").split()[0]
    got = client.succeed("curl --fail --silent --max-time 300 http://server/blob | sha256sum").split()[0]
    assert got == want, f"{got} != {want}"
    # The client's traffic leaves through the router's VLAN 1 address.
    assert "192.168.1.2" in client.succeed("ip route get 192.168.2.3")

with subtest("no forwarding, no way across"):
    router.succeed("sysctl -w net.ipv4.ip_forward=0")
    client.fail("ping -c 2 -W 2 192.168.2.3")
    client.fail("curl --fail --silent --max-time 5 http://server/")
    router.succeed("sysctl -w net.ipv4.ip_forward=1")
    client.wait_until_succeeds("ping -c 1 -W 2 192.168.2.3", timeout=60)
