//! The shop page (`GET /`) in a real browser: Debian's headless Chromium against three real agents, one
//! release serving and the next still syncing over a slow uplink. The test reads the page's DOM through
//! the DevTools protocol, tries a card through the page's own file input, stops one agent, and saves a
//! screenshot (target/artifacts/shop-page.png; README's docs/shop-page.png is a copy of one).

use deckhand_tests::browser::Browser;
use deckhand_tests::fixtures::{self, Perturbation, ReferenceSpec};
use deckhand_tests::{MIB, secs};
use std::path::Path;

/// The mean of a CSS `rgb(r, g, b)` colour's channels.
fn brightness(css: &str) -> f64 {
    let v: Vec<f64> = css
        .trim_start_matches("rgba(")
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .take(3)
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert_eq!(v.len(), 3, "not an rgb colour: {css}");
    v.iter().sum::<f64>() / 3.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_page_shows_the_fleet_syncing_tries_a_card_and_notices_a_lost_pi() {
    // Three agents serve version 1.
    let mut fleet = deckhand_tests::serving_v1("shop-page", 3, 2 * MIB).await;
    // Version 2 (the same cards, a larger release) syncs over a 1 MiB/s uplink: it takes a while.
    let spec = ReferenceSpec::small(40);
    let dir = fleet.join("release-2");
    let files = tokio::task::spawn_blocking(move || {
        fixtures::write_sized_release(&dir, &spec, 48 * MIB, 2)
    })
    .await
    .unwrap()
    .unwrap();
    fleet.s3().stats().set_uplink(MIB);
    fleet.publish(&files).await.unwrap();
    fleet
        .wait_all(secs(60), "version 2 pending", |s| {
            s.pending.as_ref().is_some_and(|p| p.version == 2)
        })
        .await
        .unwrap();

    let url = format!("http://{}/", fleet.agent(0).http());
    let photo_path = fleet.join("photo-of-card-7.jpg");
    let photo = fixtures::perturb(&fixtures::card_image(7, 0), Perturbation::Noise, 3);
    std::fs::write(&photo_path, fixtures::encode_jpeg(&photo, 85)).unwrap();
    let expected = ReferenceSpec::small(40).card_id(7);
    let lost = fleet.agent(2).status().await.unwrap().agent_id;
    let shot = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/artifacts/shop-page.png")
        .to_owned();

    let browser = tokio::task::spawn_blocking(move || {
        let mut b = Browser::launch(1200, 1000);
        b.open(&url);
        // Three Pis, each with a progress bar for version 2.
        b.wait_for(
            "three Pis",
            "document.querySelectorAll('#pis tr.pi').length === 3",
            secs(20),
        );
        b.wait_for(
            "every Pi's progress on version 2",
            "[...document.querySelectorAll('#pis tr.pi')].every(r => r.querySelector('.progress'))",
            secs(30),
        );
        let live = b.eval("[...document.querySelectorAll('#pis tr.pi')].filter(r => r.dataset.state === 'live').length");
        assert_eq!(live, 3, "every Pi is live");
        assert_eq!(
            b.eval("document.getElementById('pi-release').textContent"),
            "version 1"
        );
        let attention = b.eval("document.getElementById('pi-attention').textContent");
        assert!(
            attention
                .as_str()
                .is_some_and(|a| a.starts_with("nothing; newest release published")),
            "nothing dated needs attention: {attention}"
        );
        // Try a card through the page's own file input.
        b.set_files("#try-file", &[&photo_path]);
        let card = b.wait_for(
            "the answer to the photo",
            "document.querySelector('#try-result .card')?.dataset.card",
            secs(20),
        );
        assert_eq!(card, expected.as_str(), "the page shows the photo's card");
        // The answer shows under recent recognitions too.
        b.wait_for(
            "the recognition in the recent list",
            &format!(
                "[...document.querySelectorAll('#recent-rows tr.recognition')].some(r => r.textContent.includes('{expected}'))"
            ),
            secs(10),
        );
        b.screenshot(&shot);

        // The theme follows the browser: dark when it prefers dark.
        let background = "getComputedStyle(document.body).backgroundColor";
        let light = b.eval(background);
        b.call(
            "Emulation.setEmulatedMedia",
            serde_json::json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
        );
        let dark = b.eval(background);
        assert_ne!(light, dark, "the page has one theme only");
        assert!(
            brightness(dark.as_str().unwrap_or_default()) < 60.0
                && brightness(light.as_str().unwrap_or_default()) > 200.0,
            "light {light}, dark {dark}"
        );
        b.screenshot(&shot.with_file_name("shop-page-dark.png"));

        // On a phone held by shop staff: nothing wider than the screen, the Pis still listed.
        b.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({ "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true }),
        );
        b.wait_for(
            "the page laid out for a phone",
            "document.documentElement.clientWidth === 390",
            secs(5),
        );
        let overflow = b.eval("document.documentElement.scrollWidth - document.documentElement.clientWidth");
        assert_eq!(overflow, 0, "the page is wider than a phone");
        b.screenshot(&shot.with_file_name("shop-page-phone.png"));
        b.call("Emulation.clearDeviceMetricsOverride", serde_json::json!({}));
        b
    })
    .await
    .unwrap();

    // One agent stops: the page shows it lost within a few seconds.
    let agent = fleet.agents.remove(2);
    agent.stop().await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut b = browser;
        b.wait_for(
            "the stopped Pi as lost",
            &format!("document.querySelector('#pis tr.pi[data-id=\"{lost}\"]')?.dataset.state === 'lost'"),
            secs(10),
        );
        let live = b.eval("[...document.querySelectorAll('#pis tr.pi')].filter(r => r.dataset.state === 'live').length");
        assert_eq!(live, 2);
    })
    .await
    .unwrap();
    fleet.stop().await.unwrap();
}
