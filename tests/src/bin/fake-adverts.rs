//! Fake mDNS adverts for the discovery tests: `fake-adverts COUNT DEPLOYMENT PREFIX` registers COUNT
//! `_deckhand._udp.local.` services named PREFIX-N, each with the deployment in its TXT record as an
//! agent advertises itself, at ports nothing listens on, and keeps them until it is killed. It prints
//! `ready` once all are registered.

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, count, deployment, prefix] = args.as_slice() else {
        eprintln!("usage: fake-adverts COUNT DEPLOYMENT PREFIX");
        std::process::exit(2);
    };
    let count: u16 = count
        .parse()
        .unwrap_or_else(|e| panic!("COUNT {count:?}: {e}"));
    let daemon = mdns_sd::ServiceDaemon::new().unwrap_or_else(|e| panic!("mdns: {e}"));
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        let info = mdns_sd::ServiceInfo::new(
            deckhand_agent::peer::discovery::SERVICE,
            &name,
            &format!("{name}.local."),
            "",
            40_000 + i,
            &[("id", name.as_str()), ("deployment", deployment.as_str())][..],
        )
        .unwrap_or_else(|e| panic!("service {name}: {e}"))
        .enable_addr_auto();
        // The daemon's command queue is bounded: wait while it is full.
        let mut info = Some(info);
        while let Some(i) = info.take() {
            match daemon.register(i.clone()) {
                Ok(()) => {}
                Err(mdns_sd::Error::Again) => {
                    std::thread::sleep(Duration::from_millis(20));
                    info = Some(i);
                }
                Err(e) => panic!("register {name}: {e}"),
            }
        }
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
