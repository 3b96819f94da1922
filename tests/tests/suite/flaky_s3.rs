//! A flaky S3: the local server answers 30% of requests with 500/503, stalls some past the agents'
//! attempt timeout, cuts bodies off half way and drips others at 1 KiB/s. A fleet of four real agent
//! processes still converges with every chunk verified, a dripping range is abandoned after the
//! no-progress window and fetched again, and the requests stay bounded (retries back off; no hot loop).

use deckhand_tests::{MIB, secs, shop};
use deckhand_tools::shop::locals3::{Fault, Faults};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_four_converges_through_a_flaky_s3_with_bounded_retries() {
    const RELEASE: u64 = 32 * MIB;
    // Short client limits, so that stalls and drips are given up on in seconds: a request whose answer
    // has not begun after 2 s is tried again; a body delivering under 64 KiB in 3 s is abandoned.
    let mut fleet = shop("flaky-s3")
        .agents(4)
        .release(RELEASE)
        .agent_args(&["--origin-attempt-secs", "2", "--origin-stall-secs", "3"])
        .start()
        .await
        .unwrap();
    let stats = fleet.s3().stats();
    stats.reset();
    stats.set_faults(Some(Faults {
        errors: 0.30,
        stalls: 0.05,
        stall: Duration::from_secs(4),
        cuts: 0.05,
        drips: 0.05,
        drip_first_range: true,
        seed: 12,
    }));
    let started = Instant::now();
    let statuses = fleet
        .wait_all(secs(300), "version 1 active", |s| {
            s.active_version() == Some(1)
        })
        .await
        .unwrap();
    let took = started.elapsed();
    stats.set_faults(None);

    let requests = stats.requests();
    let ranges = stats.range_requests();
    let injected: Vec<(Fault, u64)> = [
        Fault::Error500,
        Fault::SlowDown503,
        Fault::Stall,
        Fault::Cut,
        Fault::Drip,
    ]
    .into_iter()
    .map(|f| (f, stats.injected(f)))
    .collect();
    let faulted: u64 = injected.iter().map(|(_, n)| n).sum();
    // The distinct objects and byte ranges served (whatever became of the answer): what a loop would
    // ask for again and again.
    let distinct = stats
        .ranges()
        .into_iter()
        .map(|(key, r)| (key, r.start, r.end))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let from_origin: u64 = statuses.iter().map(|s| s.bytes_from_origin).sum();
    let mut stalled = 0;
    let mut failed = 0;
    for a in &fleet.agents {
        stalled +=
            deckhand_tests::metric(a, "deckhand_origin_ranges_failed_total{why=\"stalled\"}").await;
        failed +=
            deckhand_tests::metric(a, "deckhand_origin_ranges_failed_total{why=\"error\"}").await;
    }
    eprintln!(
        "flaky S3: converged in {:.1} s; {requests} requests ({ranges} ranged, {distinct} distinct ranges), {faulted} faulted \
         ({injected:?}); S3 sent {} bytes, the agents kept {from_origin} from it ({:.2}x the release); \
         ranges abandoned as stalled {stalled}, failed {failed}",
        took.as_secs_f64(),
        stats.bytes_sent(),
        from_origin as f64 / RELEASE as f64,
    );

    // The faults really happened, every kind of them.
    for (f, n) in &injected {
        assert!(*n > 0, "no {f:?} was injected: {injected:?}");
    }
    assert!(
        faulted * 100 >= requests * 25,
        "{faulted} of {requests} requests faulted"
    );
    // The dripping range was abandoned after the no-progress window (and the release still completed,
    // so it was fetched again).
    assert!(stalled >= 1, "no range was abandoned as stalled");
    // Bounded: no hot loop. Retries back off (the SDK's, then the sync engine's), so the request rate
    // stays far below what a loop would make, and a range is asked for a few times at most.
    let rate = requests as f64 / took.as_secs_f64();
    assert!(rate < 60.0, "{requests} requests in {took:?}: {rate:.0}/s");
    assert!(
        ranges <= 4 * distinct,
        "{ranges} range requests for {distinct} distinct ranges"
    );
    // Peers carried the rest: S3's bytes stay near one copy of the release despite the waste.
    assert!(
        from_origin <= 2 * RELEASE,
        "the agents took {from_origin} bytes from S3 for a {RELEASE}-byte release"
    );

    // Every agent's store verifies: every chunk it holds hashes to its id.
    for a in std::mem::take(&mut fleet.agents) {
        let dir = fleet.join(&a.name);
        a.stop().await.unwrap();
        deckhand_tests::verify_store(&dir);
    }
    fleet.stop().await.unwrap();
}
