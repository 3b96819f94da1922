//! Network namespaces for a shop on one machine (tests and benches; needs root and iproute2): each Pi
//! in its own namespace, plugged into a bridge (the shop's switch) or joined to another by a veth pair,
//! so that mDNS and QUIC cross a real network that never leaves the machine. A namespace is deleted,
//! with its interfaces, when its value is dropped.

use crate::ToolError;

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A new namespace `dh-<name>-<pid>` (one left by an earlier run of this process id is deleted
    /// first), its loopback up.
    pub fn new(name: &str) -> Result<Self, ToolError> {
        let name = format!("dh-{name}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace and checks that it succeeded.
    pub fn exec(&self, cmd: &[&str]) -> Result<(), ToolError> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Joins `self` and `other` with a veth pair, addressed `a`/`b` (CIDR), both up.
    pub fn link(&self, a: &str, other: &NetNs, b: &str) -> Result<(), ToolError> {
        let (va, vb) = (
            format!("dha{}", std::process::id() % 100_000),
            format!("dhb{}", std::process::id() % 100_000),
        );
        veth((&va, self), (&vb, other))?;
        for (ns, dev, addr) in [(self, &va, a), (other, &vb, b)] {
            ns.exec(&["ip", "addr", "add", addr, "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "multicast", "on", "up"])?;
        }
        Ok(())
    }

    /// A bridge `dev` in this namespace, up: the shop's LAN switch. Multicast goes to every port (mDNS).
    pub fn bridge(&self, dev: &str) -> Result<(), ToolError> {
        self.exec(&[
            "ip",
            "link",
            "add",
            dev,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        self.exec(&["ip", "link", "set", dev, "up"])
    }

    /// Plugs `other` into `bridge` (in this namespace) with a veth pair: `port` is the end on the
    /// bridge, and the end in `other`, `lan0`, is addressed `addr` (CIDR). Both are up.
    pub fn plug(
        &self,
        bridge: &str,
        port: &str,
        other: &NetNs,
        addr: &str,
    ) -> Result<(), ToolError> {
        veth((port, self), ("lan0", other))?;
        self.exec(&["ip", "link", "set", port, "master", bridge, "up"])?;
        other.exec(&["ip", "addr", "add", addr, "dev", "lan0"])?;
        other.exec(&["ip", "link", "set", "lan0", "multicast", "on", "up"])
    }

    /// Sets device `dev` in this namespace up or down (a cable plugged in or pulled out).
    pub fn set_link(&self, dev: &str, up: bool) -> Result<(), ToolError> {
        self.exec(&["ip", "link", "set", dev, if up { "up" } else { "down" }])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends inside it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair: end `a.0` in namespace `a.1`, end `b.0` in `b.1`.
fn veth(a: (&str, &NetNs), b: (&str, &NetNs)) -> Result<(), ToolError> {
    ip(&[
        "link", "add", a.0, "netns", &a.1.name, "type", "veth", "peer", "name", b.0, "netns",
        &b.1.name,
    ])
}

fn ip(args: &[&str]) -> Result<(), ToolError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| ToolError::Netns(format!("cannot run ip (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ToolError::Netns(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
