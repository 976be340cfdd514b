# PostgreSQL over the network, in the style of the NixOS postgresql
# examples: the server listens on its VLAN address, the client connects
# with `psql -h server`, creates a table, inserts 10,000 rows and reads
# back their count and sum.
start_all()
server.wait_for_unit("postgresql.service")
client.wait_for_unit("multi-user.target")

with subtest("the server listens on its VLAN address"):
    conf = server.succeed("ls -d /etc/postgresql/*/main").strip()
    server.succeed(
        f"echo \"listen_addresses = '*'\" >> {conf}/postgresql.conf",
        f"echo 'host all all 192.168.1.0/24 trust' >> {conf}/pg_hba.conf",
        "systemctl restart postgresql.service",
    )
    server.wait_for_unit("postgresql.service")
    server.wait_until_succeeds("ss -Hltn 'sport = :5432' | grep -q 0.0.0.0", timeout=120)
    server.succeed("runuser -u postgres -- psql -c 'CREATE DATABASE shop'")

with subtest("the client writes and reads 10,000 rows"):
    psql = "psql -h server -U postgres -d shop -v ON_ERROR_STOP=1 -At"
    client.succeed(f"{psql} -c 'CREATE TABLE items (id integer PRIMARY KEY, price integer)'")
    # The rows travel from the client: COPY from its stdin.
    client.succeed(
        f"seq 1 10000 | awk '{{print $1 \",\" $1 * 3}}' | "
        f"{psql} -c '\\copy items FROM pstdin WITH (FORMAT csv)'"
    )
    out = client.succeed(f"{psql} -c 'SELECT count(*), sum(price) FROM items'").strip()
    assert out == "10000|150015000", out
