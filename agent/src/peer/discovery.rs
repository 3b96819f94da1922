//! Finding peers on the LAN: mDNS (DNS-SD service `_deckhand._udp.local.`), besides static `--peer`s.
//!
//! Each agent registers its QUIC port under its agent id, with its deployment in a TXT record, and browses
//! for others. An address found this way is only a hint: the QUIC handshake decides whether it is a fleet
//! member (`fleet`), so a device on the LAN that answers mDNS gains nothing by it.

use crate::peer::PeerNode;
use std::net::SocketAddr;

pub const SERVICE: &str = "_deckhand._udp.local.";

/// How often the mDNS daemon lists the interfaces for a changed address (its default, 5 s, was a
/// third of an idle agent's system calls: a netlink dump and an ioctl per interface each time). A Pi
/// renumbered by DHCP announces its new address within this.
const IP_CHECK_SECS: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// A running mDNS responder and browser. Dropping it unregisters and stops.
pub struct Mdns {
    daemon: mdns_sd::ServiceDaemon,
    fullname: String,
}

impl Mdns {
    /// Registers this agent and browses for others. The returned future hands what the browser finds to
    /// the peer node; the caller owns it (runs it on its task set) and it ends when `stop` turns true or
    /// the daemon shuts down (the [`Mdns`] is dropped).
    pub fn start(
        node: PeerNode,
        deployment: &str,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Mdns, impl Future<Output = ()> + Send + 'static), DiscoveryError> {
        let daemon = mdns_sd::ServiceDaemon::new()?;
        daemon.set_ip_check_interval(IP_CHECK_SECS)?;
        let me = node.me().to_owned();
        let port = node.listen_addr().port();
        let info = mdns_sd::ServiceInfo::new(
            SERVICE,
            &me,
            &format!("{me}.local."),
            "",
            port,
            &[("id", me.as_str()), ("deployment", deployment)][..],
        )?
        .enable_addr_auto();
        let fullname = info.get_fullname().to_owned();
        daemon.register(info)?;
        let events = daemon.browse(SERVICE)?;
        let deployment = deployment.to_owned();
        let browse = async move {
            loop {
                let event = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    e = events.recv_async() => match e {
                        Ok(e) => e,
                        Err(_) => return,
                    },
                };
                let mdns_sd::ServiceEvent::ServiceResolved(info) = event else {
                    continue;
                };
                let id = info.get_property_val_str("id").unwrap_or_default();
                if id == me {
                    continue;
                }
                if info.get_property_val_str("deployment") != Some(deployment.as_str()) {
                    continue;
                }
                for ip in info.get_addresses() {
                    let addr = SocketAddr::new(ip.to_ip_addr(), info.get_port());
                    tracing::debug!(peer = id, %addr, "found by mdns");
                    node.add_addr(addr);
                }
            }
        };
        Ok((Mdns { daemon, fullname }, browse))
    }
}

impl Drop for Mdns {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}
