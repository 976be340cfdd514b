//! The test network, numbered as NixOS numbers it: which node is on which
//! VLAN, with which MAC and addresses, what the guest is told about it on
//! its kernel command line, and the switches that carry it.
//!
//! Invariants:
//! - Nodes are numbered from 1 in name order (byte order, as Nix sorts
//!   attribute names), every node counted, VLANs or not; there are at most
//!   [`MAX_NODES`]. VLAN numbers are 1 to [`MAX_VLAN`], none twice in one
//!   node. So both fit the MAC's and the IPv4 address's last bytes.
//! - NIC k (from 1) of a node is on the k-th VLAN of its list, is `eth<k>`
//!   in the guest and `eth<k>` to skiff-vmm (so also `virtio-net-pci.<k>`
//!   for QMP `set_link`), has MAC `52:54:00:12:<vlan>:<node>` and the
//!   addresses `192.168.<vlan>.<node>/24` and `2001:db8:<vlan>::<node>/64`.
//! - A node's kernel command line, network parameters included, is at most
//!   [`MAX_CMDLINE`] bytes; a longer one is refused before any VM starts.
//! - One switch per VLAN any node is on, on [`socket_path`] in the test's
//!   state directory, started before the VMs and stopped after them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use skiff_vmm::config::{MacAddr, NetBackend, NetConfig};
use thiserror::Error;

use crate::report::logger;
use crate::switch::{Switch, SwitchError, SwitchHandle};

/// Most nodes a test may have: node numbers are the last byte of an IPv4
/// address and 255 would be the broadcast address.
pub const MAX_NODES: usize = 254;
/// Highest VLAN number: it is one byte of the MAC and the IPv4 address.
pub const MAX_VLAN: u32 = 255;
/// Longest kernel command line Linux on x86 keeps, in bytes: its
/// `COMMAND_LINE_SIZE` is 2048 with the terminating NUL, and the boot
/// header's `cmdline_size` says 2047. Anything longer is cut off.
pub const MAX_CMDLINE: usize = 2047;

/// Why a test's network cannot be set up as described.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NetworkError {
    #[error("node {node:?}: VLAN {vlan} is out of range (VLAN numbers are 1 to {MAX_VLAN})")]
    VlanRange { node: String, vlan: i64 },
    #[error("node {node:?}: VLAN {vlan} is listed twice in \"vlans\"")]
    VlanTwice { node: String, vlan: u8 },
    #[error(
        "the test has {count} nodes, more than {MAX_NODES}: node numbers are the last byte of 192.168.<vlan>.<node>"
    )]
    TooManyNodes { count: usize },
    #[error(
        "node {node:?}: its kernel command line would be {len} bytes long with the network parameters of the test's {nodes} node(s) (skiff.hosts names every node on a VLAN); Linux on x86 keeps only {MAX_CMDLINE} bytes and would cut the rest off. Use fewer nodes, shorter node names or a shorter \"cmdline\""
    )]
    CmdlineTooLong {
        node: String,
        len: usize,
        nodes: usize,
    },
}

/// One network card of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nic {
    /// From 1: the card is `eth<index>` in the guest.
    pub index: usize,
    pub vlan: u8,
    /// The node's number.
    pub node: u8,
}

impl Nic {
    /// `eth<index>`: the guest's name for the card, and its id in
    /// skiff-vmm.
    pub fn name(&self) -> String {
        format!("eth{}", self.index)
    }

    /// `52:54:00:12:<vlan>:<node>`.
    pub fn mac(&self) -> MacAddr {
        MacAddr([0x52, 0x54, 0x00, 0x12, self.vlan, self.node])
    }

    /// `192.168.<vlan>.<node>`.
    pub fn ipv4(&self) -> Ipv4Addr {
        ipv4(self.vlan, self.node)
    }

    /// `2001:db8:<vlan>::<node>`.
    pub fn ipv6(&self) -> Ipv6Addr {
        ipv6(self.vlan, self.node)
    }

    /// The card as skiff-vmm takes it, on the VLAN's switch in `state_dir`.
    pub fn net_config(&self, state_dir: &Path) -> NetConfig {
        NetConfig {
            backend: NetBackend::Stream(socket_path(state_dir, self.vlan)),
            mac: self.mac(),
            id: Some(self.name()),
        }
    }
}

fn ipv4(vlan: u8, node: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, vlan, node)
}

/// NixOS writes the decimal numbers into the address text as they are, so
/// VLAN 12 is the group `12` (0x12), not 0xc.
fn ipv6(vlan: u8, node: u8) -> Ipv6Addr {
    let group = |n: u8| {
        u16::from_str_radix(&n.to_string(), 16).expect("three decimal digits are valid hex")
    };
    Ipv6Addr::new(0x2001, 0xdb8, group(vlan), 0, 0, 0, 0, group(node))
}

/// A node's place in the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// From 1, in name order.
    pub number: u8,
    /// Its cards, in order.
    pub nics: Vec<Nic>,
}

/// Numbers and cards of every node of a test.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub nodes: BTreeMap<String, NodeNet>,
}

/// One `/etc/hosts` name: a node on a VLAN, at its first VLAN's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub vlan: u8,
    pub node: u8,
}

impl Plan {
    /// Numbers the nodes (given with their `vlans` lists) and gives them
    /// their cards; checks the limits.
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = (&'a str, &'a [i64])>,
    ) -> Result<Plan, NetworkError> {
        let mut sorted: Vec<(&str, &[i64])> = nodes.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        if sorted.len() > MAX_NODES {
            return Err(NetworkError::TooManyNodes {
                count: sorted.len(),
            });
        }
        let mut plan = Plan::default();
        for (i, (name, vlans)) in sorted.into_iter().enumerate() {
            let number = u8::try_from(i + 1).expect("at most 254 nodes");
            let mut nics: Vec<Nic> = Vec::new();
            for &v in vlans {
                let vlan = u8::try_from(v)
                    .ok()
                    .filter(|v| *v >= 1 && u32::from(*v) <= MAX_VLAN)
                    .ok_or_else(|| NetworkError::VlanRange {
                        node: name.to_owned(),
                        vlan: v,
                    })?;
                if nics.iter().any(|n| n.vlan == vlan) {
                    return Err(NetworkError::VlanTwice {
                        node: name.to_owned(),
                        vlan,
                    });
                }
                nics.push(Nic {
                    index: nics.len() + 1,
                    vlan,
                    node: number,
                });
            }
            plan.nodes.insert(name.to_owned(), NodeNet { number, nics });
        }
        Ok(plan)
    }

    /// Every VLAN some node is on, ascending.
    pub fn vlans(&self) -> BTreeSet<u8> {
        self.nodes
            .values()
            .flat_map(|n| n.nics.iter().map(|c| c.vlan))
            .collect()
    }

    /// The hosts entries every node gets: each node with a VLAN, at its
    /// first one, in name order.
    pub fn hosts(&self) -> Vec<Host> {
        self.nodes
            .iter()
            .filter_map(|(name, n)| {
                n.nics.first().map(|c| Host {
                    name: name.clone(),
                    vlan: c.vlan,
                    node: n.number,
                })
            })
            .collect()
    }

    /// `cmdline` with node `name`'s network parameters ([`guest_params`])
    /// appended; refused when it would be longer than Linux keeps.
    pub fn node_cmdline(&self, name: &str, cmdline: &str) -> Result<String, NetworkError> {
        let nics = self.nodes.get(name).map_or(&[][..], |n| &n.nics);
        let params = guest_params(name, nics, &self.hosts());
        let full = if cmdline.is_empty() {
            params
        } else {
            format!("{cmdline} {params}")
        };
        if full.len() > MAX_CMDLINE {
            return Err(NetworkError::CmdlineTooLong {
                node: name.to_owned(),
                len: full.len(),
                nodes: self.nodes.len(),
            });
        }
        Ok(full)
    }
}

/// What a guest learns about the network, as kernel parameters separated
/// by spaces (the guest images read exactly this):
///
/// - `skiff.hostname=<node name>`
/// - one `skiff.ip=<mac>,<ipv4>/<prefix>,<ipv6>/<prefix>` per card, in card
///   order: the k-th is `eth<k>`. For example
///   `skiff.ip=52:54:00:12:01:02,192.168.1.2/24,2001:db8:1::2/64`. The MAC
///   is six pairs of lower-case hex digits.
/// - `skiff.hosts=<name>@<vlan>.<node>[,<name>@<vlan>.<node>...]`: every
///   node with at least one VLAN, at its first VLAN and its number, in name
///   order. Each stands for the hosts entries `192.168.<vlan>.<node>
///   <name>` and `2001:db8:<vlan>::<node> <name>`. Left out when no node
///   has a VLAN.
///
/// VLAN and node numbers are written in decimal, in the IPv6 address too
/// (`2001:db8:12::3` for VLAN 12, node 3, as NixOS writes it).
pub fn guest_params(hostname: &str, nics: &[Nic], hosts: &[Host]) -> String {
    let mut p = format!("skiff.hostname={hostname}");
    for nic in nics {
        p += &format!(
            " skiff.ip={},{}/24,{}/64",
            nic.mac(),
            nic.ipv4(),
            nic.ipv6()
        );
    }
    if !hosts.is_empty() {
        let list: Vec<String> = hosts
            .iter()
            .map(|h| format!("{}@{}.{}", h.name, h.vlan, h.node))
            .collect();
        p += &format!(" skiff.hosts={}", list.join(","));
    }
    p
}

/// One line on node number `number`'s cards, for the log.
pub fn summary(number: u8, nics: &[Nic]) -> String {
    let mut s = format!("node number {number}");
    if nics.is_empty() {
        s += ", no network card";
    }
    for nic in nics {
        s += &format!(
            "; {} on vlan{}: {} {}/24 {}/64",
            nic.name(),
            nic.vlan,
            nic.mac(),
            nic.ipv4(),
            nic.ipv6()
        );
    }
    s
}

/// The directory of VLAN `vlan`'s switch (the script's `vlan<N>.socket_dir`).
pub fn socket_dir(state_dir: &Path, vlan: u8) -> PathBuf {
    state_dir.join(format!("vlan{vlan}"))
}

/// The socket VLAN `vlan`'s switch listens on.
pub fn socket_path(state_dir: &Path, vlan: u8) -> PathBuf {
    socket_dir(state_dir, vlan).join("socket")
}

/// A VLAN as the test script sees it (upstream's `VLan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vlan {
    pub nr: u8,
    /// The directory of the switch's socket.
    pub socket_dir: PathBuf,
    /// The socket VMs connect to.
    pub socket: PathBuf,
}

/// The running switches of a test, one per VLAN.
pub struct Switches {
    running: Vec<(u8, SwitchHandle)>,
}

impl Switches {
    /// Starts a switch for each of `vlans` in `state_dir`; with
    /// `pcap_dir`, each captures to `vlan<N>.pcap` there. If one cannot
    /// start, those started are stopped again.
    pub fn start(
        vlans: &BTreeSet<u8>,
        state_dir: &Path,
        pcap_dir: Option<&Path>,
    ) -> Result<Switches, SwitchError> {
        let mut switches = Switches {
            running: Vec::new(),
        };
        if vlans.is_empty() {
            return Ok(switches);
        }
        let started = std::time::Instant::now();
        logger().begin_nested(None, "start all VLans");
        for &vlan in vlans {
            let dir = socket_dir(state_dir, vlan);
            let made = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir);
            let pcap = pcap_dir.map(|d| d.join(format!("vlan{vlan}.pcap")));
            let result = match made {
                Ok(()) => Switch::new(vlan.into(), socket_path(state_dir, vlan))
                    .pcap(pcap)
                    .start(),
                Err(error) => Err(SwitchError::Listen {
                    label: format!("vlan{vlan}"),
                    path: dir,
                    error,
                }),
            };
            match result {
                Ok(handle) => switches.running.push((vlan, handle)),
                Err(e) => {
                    logger().end_nested(None, "start all VLans", started.elapsed().as_secs_f64());
                    switches.stop();
                    return Err(e);
                }
            }
        }
        logger().end_nested(None, "start all VLans", started.elapsed().as_secs_f64());
        Ok(switches)
    }

    /// The VLANs with a running switch, ascending.
    pub fn vlans(&self) -> Vec<Vlan> {
        self.running
            .iter()
            .map(|(nr, h)| Vlan {
                nr: *nr,
                socket_dir: h.socket().parent().unwrap_or(Path::new("/")).to_owned(),
                socket: h.socket().to_owned(),
            })
            .collect()
    }

    /// Stops every switch; each logs its counters.
    pub fn stop(&mut self) {
        for (_, handle) in self.running.drain(..) {
            handle.stop();
        }
    }
}

impl Drop for Switches {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;

    fn plan(nodes: &[(&str, &[i64])]) -> Result<Plan, NetworkError> {
        Plan::new(nodes.iter().map(|(n, v)| (*n, *v)))
    }

    #[test]
    fn nodes_are_numbered_in_name_order_and_cards_follow_the_vlan_list() {
        let p = plan(&[
            ("server", &[1]),
            ("router", &[2, 1]),
            ("client", &[1]),
            ("alone", &[]),
        ])
        .unwrap();
        let number = |n: &str| p.nodes[n].number;
        assert_eq!(
            [
                number("alone"),
                number("client"),
                number("router"),
                number("server")
            ],
            [1, 2, 3, 4]
        );
        assert_eq!(
            summary(3, &p.nodes["router"].nics),
            "node number 3; eth1 on vlan2: 52:54:00:12:02:03 192.168.2.3/24 2001:db8:2::3/64; \
             eth2 on vlan1: 52:54:00:12:01:03 192.168.1.3/24 2001:db8:1::3/64"
        );
        let router = &p.nodes["router"].nics;
        assert_eq!(
            router,
            &[
                Nic {
                    index: 1,
                    vlan: 2,
                    node: 3
                },
                Nic {
                    index: 2,
                    vlan: 1,
                    node: 3
                }
            ]
        );
        assert_eq!(router[0].name(), "eth1");
        assert_eq!(router[1].name(), "eth2");
        assert!(p.nodes["alone"].nics.is_empty());
        assert_eq!(p.vlans(), BTreeSet::from([1, 2]));
        // Byte order, as Nix sorts attribute names: upper case first.
        let p = plan(&[("b", &[1]), ("B", &[1]), ("a", &[1])]).unwrap();
        assert_eq!(p.nodes.keys().collect::<Vec<_>>(), ["B", "a", "b"]);
        assert_eq!(p.nodes["B"].number, 1);
        assert_eq!(p.nodes["b"].number, 3);
    }

    #[test]
    fn macs_and_addresses() {
        let nic = Nic {
            index: 1,
            vlan: 1,
            node: 2,
        };
        assert_eq!(nic.mac().to_string(), "52:54:00:12:01:02");
        assert_eq!(nic.ipv4().to_string(), "192.168.1.2");
        assert_eq!(nic.ipv6().to_string(), "2001:db8:1::2");
        let nic = Nic {
            index: 3,
            vlan: 255,
            node: 254,
        };
        assert_eq!(nic.mac().to_string(), "52:54:00:12:ff:fe");
        assert_eq!(nic.ipv4().to_string(), "192.168.255.254");
        assert_eq!(nic.ipv6().to_string(), "2001:db8:255::254");
        let nic = Nic {
            index: 1,
            vlan: 12,
            node: 10,
        };
        assert_eq!(nic.mac().to_string(), "52:54:00:12:0c:0a");
        assert_eq!(nic.ipv6().to_string(), "2001:db8:12::10");
        let net = nic.net_config(Path::new("/state"));
        assert_eq!(
            net.backend,
            NetBackend::Stream(PathBuf::from("/state/vlan12/socket"))
        );
        assert_eq!(net.mac, nic.mac());
        assert_eq!(net.id.as_deref(), Some("eth1"));
    }

    #[test]
    fn the_guest_parameters_have_the_documented_format() {
        let p = plan(&[
            ("client", &[1]),
            ("router", &[2, 1]),
            ("server", &[2]),
            ("x", &[]),
        ])
        .unwrap();
        let hosts = "skiff.hosts=client@1.1,router@2.2,server@2.3";
        assert_eq!(
            p.node_cmdline("router", "console=ttyS0").unwrap(),
            format!(
                "console=ttyS0 skiff.hostname=router \
                 skiff.ip=52:54:00:12:02:02,192.168.2.2/24,2001:db8:2::2/64 \
                 skiff.ip=52:54:00:12:01:02,192.168.1.2/24,2001:db8:1::2/64 {hosts}"
            )
        );
        assert_eq!(
            p.node_cmdline("x", "").unwrap(),
            format!("skiff.hostname=x {hosts}")
        );
        // Every address the parameters name parses.
        for word in p.node_cmdline("router", "").unwrap().split(' ') {
            if let Some(ip) = word.strip_prefix("skiff.ip=") {
                let parts: Vec<&str> = ip.split(',').collect();
                assert_eq!(parts.len(), 3);
                parts[0].parse::<MacAddr>().unwrap();
                let (v4, len4) = parts[1].split_once('/').unwrap();
                v4.parse::<Ipv4Addr>().unwrap();
                assert_eq!(len4, "24");
                let (v6, len6) = parts[2].split_once('/').unwrap();
                v6.parse::<Ipv6Addr>().unwrap();
                assert_eq!(len6, "64");
            }
        }
        // No node on a VLAN: no hosts parameter.
        let p = plan(&[("a", &[]), ("b", &[])]).unwrap();
        assert_eq!(
            p.node_cmdline("a", "quiet").unwrap(),
            "quiet skiff.hostname=a"
        );
        assert_eq!(
            summary(2, &p.nodes["a"].nics),
            "node number 2, no network card"
        );
        assert_eq!(
            guest_params(
                "m",
                &[Nic {
                    index: 1,
                    vlan: 1,
                    node: 1
                }],
                &[]
            ),
            "skiff.hostname=m skiff.ip=52:54:00:12:01:01,192.168.1.1/24,2001:db8:1::1/64"
        );
    }

    #[test]
    fn bad_vlans_and_too_many_nodes_are_refused() {
        for v in [0, 256, -1, 1 << 40] {
            assert_eq!(
                plan(&[("a", &[]), ("web", &[1, v])]).unwrap_err(),
                NetworkError::VlanRange {
                    node: "web".into(),
                    vlan: v
                }
            );
        }
        let e = plan(&[("web", &[3, 1, 3])]).unwrap_err();
        assert_eq!(
            e,
            NetworkError::VlanTwice {
                node: "web".into(),
                vlan: 3
            }
        );
        assert_eq!(
            e.to_string(),
            "node \"web\": VLAN 3 is listed twice in \"vlans\""
        );
        let names: Vec<String> = (0..255).map(|i| format!("n{i:03}")).collect();
        let none: &[i64] = &[];
        let e = Plan::new(names.iter().map(|n| (n.as_str(), none))).unwrap_err();
        assert_eq!(e, NetworkError::TooManyNodes { count: 255 });
        assert!(e.to_string().contains("255 nodes, more than 254"), "{e}");
        let p = Plan::new(names[..254].iter().map(|n| (n.as_str(), &[255i64][..]))).unwrap();
        assert_eq!(p.nodes["n253"].number, 254);
        assert_eq!(
            p.nodes["n253"].nics[0].mac().to_string(),
            "52:54:00:12:ff:fe"
        );
    }

    #[test]
    fn a_command_line_longer_than_linux_keeps_is_refused() {
        // 100 nodes named like "node-000": 17 bytes each in skiff.hosts.
        let names: Vec<String> = (0..100).map(|i| format!("node-{i:03}")).collect();
        let p = Plan::new(names.iter().map(|n| (n.as_str(), &[1i64][..]))).unwrap();
        let ok = p.node_cmdline("node-000", "console=ttyS0").unwrap();
        assert!(ok.len() <= MAX_CMDLINE);
        let room = MAX_CMDLINE - ok.len();
        // Exactly at the limit passes; one byte more does not.
        let filler = "x".repeat(room - 1);
        let at = format!("console=ttyS0 {filler}");
        assert_eq!(p.node_cmdline("node-000", &at).unwrap().len(), MAX_CMDLINE);
        let over = format!("{at}y");
        let e = p.node_cmdline("node-000", &over).unwrap_err();
        assert_eq!(
            e,
            NetworkError::CmdlineTooLong {
                node: "node-000".into(),
                len: MAX_CMDLINE + 1,
                nodes: 100
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("2048 bytes long")
                && text.contains("100 node(s)")
                && text.contains("2047"),
            "{text}"
        );
        // 200 such nodes do not fit at all.
        let names: Vec<String> = (0..200).map(|i| format!("node-{i:03}")).collect();
        let p = Plan::new(names.iter().map(|n| (n.as_str(), &[1i64][..]))).unwrap();
        assert!(matches!(
            p.node_cmdline("node-000", ""),
            Err(NetworkError::CmdlineTooLong { nodes: 200, .. })
        ));
    }

    fn tmp(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-net-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// One frame, with QEMU's stream framing (a big-endian length first).
    fn framed(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(b"hello, vlan");
        let mut w = (f.len() as u32).to_be_bytes().to_vec();
        w.extend_from_slice(&f);
        w
    }

    #[test]
    fn switches_start_carry_a_frame_and_stop() {
        let d = tmp("switches");
        let state = d.join("state");
        let out = d.join("out");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let mut sw = Switches::start(&BTreeSet::from([1, 2]), &state, Some(&out)).unwrap();
        let vlans = sw.vlans();
        assert_eq!(vlans.len(), 2);
        assert_eq!(
            (vlans[1].nr, &vlans[1].socket_dir, &vlans[1].socket),
            (2, &state.join("vlan2"), &state.join("vlan2/socket"))
        );
        let a_nic = Nic {
            index: 1,
            vlan: 1,
            node: 1,
        };
        let NetBackend::Stream(path) = a_nic.net_config(&state).backend;
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        // Both ports are up before the frame goes out.
        let t = Instant::now();
        while sw.running[0].1.counters().ports.len() < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "ports never connected"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let wire = framed([0xff; 6], a_nic.mac().0);
        a.write_all(&wire).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0; wire.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, wire);
        sw.stop();
        assert!(!path.exists(), "the socket is removed");
        assert!(sw.vlans().is_empty());
        let pcap = std::fs::read(out.join("vlan1.pcap")).unwrap();
        // Header (24 bytes), one record header (16) and the frame.
        assert_eq!(pcap.len(), 24 + 16 + wire.len() - 4);
        assert_eq!(std::fs::read(out.join("vlan2.pcap")).unwrap().len(), 24);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_switch_that_cannot_start_stops_the_others() {
        let d = tmp("switch-fail");
        // VLAN 2's directory cannot be made: a file is in the way.
        std::fs::write(d.join("vlan2"), b"").unwrap();
        let e = Switches::start(&BTreeSet::from([1, 2]), &d, None)
            .err()
            .expect("vlan2 cannot start");
        assert!(e.to_string().starts_with("vlan2: cannot listen on"), "{e}");
        assert!(!socket_path(&d, 1).exists(), "vlan1's switch was stopped");
        assert!(Switches::start(&BTreeSet::new(), &d, None)
            .unwrap()
            .vlans()
            .is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
