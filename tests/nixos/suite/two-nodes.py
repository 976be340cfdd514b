# Names with '-' are bound with '_'; with two machines there is no `machine`.
assert "machine" not in globals()
assert [m.name for m in machines] == ["node-a", "node-b"]
start_all()
assert node_a.booted and node_b.booted
assert node_a.succeed("echo a") == "a\n"
assert node_b.succeed("nproc").strip() == "2"
# Power both off from inside and wait for both.
for m in machines:
    m.execute("poweroff", check_return=False, check_output=False)
join_all()
assert not node_a.booted and not node_b.booted
