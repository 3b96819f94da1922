//! `deckhand bench shadow`: how long a shadow evaluation of a release on 300 kept samples takes on the
//! CPU backend, and what it does to live answers (p50/p99 with and without an evaluation running).

use super::recognizer::{load, load_test, noisy_photos, percentile};
use crate::error::ToolError;
use crate::shop::fixtures::{self, ReferenceSpec};
use deckhand_agent::metrics::Metrics;
use deckhand_agent::recognizer::service::Service;
use deckhand_agent::recognizer::shadow::{Samples, evaluate};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Live clients while measuring latency (a busy counter: two tills asking back to back).
const CLIENTS: usize = 2;

pub async fn run(samples: usize) -> Result<(), ToolError> {
    let work = tempfile::Builder::new()
        .prefix("deckhand-bench-")
        .tempdir()
        .map_err(ToolError::TempDir)?;
    let spec = ReferenceSpec {
        cards: 2000,
        rows: 2200,
        ..ReferenceSpec::full()
    };
    let files = fixtures::write_reference_release(&work.path().join("release"), &spec)?;
    println!(
        "shadow evaluation benchmark (cpu backend), {} cores, reference DB {} rows x {} dims",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        spec.rows,
        spec.dim
    );
    let service = Service::start(
        Arc::new(Metrics::default()),
        deckhand_agent::recognizer::cpu::Cores::one(),
    )
    .map_err(ToolError::Service)?;
    let kept = Samples::start(samples).map_err(ToolError::Service)?;
    service.keep_samples(kept.clone());
    service.activate(load(&files, &spec, 1)?, &[])?;
    let photos = noisy_photos(&spec, samples.max(64));
    // The counter's traffic fills the sample.
    for p in photos.iter().take(samples) {
        service
            .recognize(p.clone())
            .await
            .map_err(|e| ToolError::Shadow(format!("a sample photo was not recognised: {e}")))?;
    }
    let waited = Instant::now();
    while (kept.answered_by(1) as usize) < samples && waited.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let have = kept.answered_by(1);
    let mut candidate = load(&files, &spec, 2)?;

    // 1. Alone.
    let t = Instant::now();
    let (c, f) = evaluate(kept.clone(), 1, candidate)
        .await
        .map_err(ToolError::Shadow)?;
    candidate = c;
    let alone = t.elapsed();
    println!(
        "\n  evaluation of {have} samples, nothing else running: {:.2} s ({:.1} ms a sample)\n    {f}",
        alone.as_secs_f64(),
        alone.as_secs_f64() * 1000.0 / f64::from(have.max(1))
    );

    // 2. Live latency without, then with, evaluations running (one after another, for the window).
    let window = Duration::from_secs(6);
    let quiet = load_test(&service, &photos, CLIENTS, window, None).await;
    let stop = Instant::now() + window;
    let evaluator = {
        let kept = kept.clone();
        tokio::spawn(async move {
            let mut runs = Vec::new();
            let mut c = candidate;
            while Instant::now() < stop {
                let t = Instant::now();
                match evaluate(kept.clone(), 1, c).await {
                    Ok((back, _)) => c = back,
                    Err(_) => break,
                }
                runs.push(t.elapsed());
            }
            runs
        })
    };
    let busy = load_test(&service, &photos, CLIENTS, window, None).await;
    let runs = evaluator.await.unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\n  live answers, {CLIENTS} clients back to back for {} s each:",
        window.as_secs()
    );
    println!(
        "    without an evaluation: {} answers, p50 {:.1} ms, p99 {:.1} ms",
        quiet.len(),
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 0.99))
    );
    println!(
        "    with evaluations running (nice 19): {} answers, p50 {:.1} ms, p99 {:.1} ms",
        busy.len(),
        ms(percentile(&busy, 0.5)),
        ms(percentile(&busy, 0.99))
    );
    if let Some(last) = runs.last() {
        println!(
            "    evaluations meanwhile: {} (the last took {:.2} s of {have} samples)",
            runs.len(),
            last.as_secs_f64()
        );
    }
    service.shutdown();
    Ok(())
}
