//! `deckhand bench recognizer`: accuracy on perturbed photos, throughput and latency on the CPU backend,
//! usearch search time, cold start, and p99 during a swap.

use crate::error::ToolError;
use crate::shop::fixtures::{
    self, Perturbation, ReferenceSpec, card_image, perturb, reference_settings,
};
use deckhand_agent::metrics::Metrics;
use deckhand_agent::recognizer::cpu::Cores;
use deckhand_agent::recognizer::service::Service;
use deckhand_agent::recognizer::{BackendChoice, BackendError, Recognizer, ReleasePaths};
use deckhand_agent::release::ReleaseFiles;
use deckhand_protocol::BlobId;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn paths(f: &ReleaseFiles) -> ReleasePaths {
    ReleasePaths {
        hef: f.hef.clone(),
        onnx: f.onnx.clone(),
        index: f.index.clone(),
        labels: f.labels.clone(),
        metadata: f.metadata.clone(),
    }
}

/// Loads a generated reference release on the CPU.
pub fn load(
    files: &ReleaseFiles,
    spec: &ReferenceSpec,
    version: u64,
) -> Result<Recognizer, ToolError> {
    Recognizer::load(
        &paths(files),
        &reference_settings(spec.dim),
        version,
        BlobId::of(&version.to_le_bytes()),
        BackendChoice::Cpu,
    )
    .map_err(ToolError::from)
}

/// Top-1 accuracy per perturbation: `photos` photos of random cards for each kind.
pub fn accuracy(
    rec: &Recognizer,
    spec: &ReferenceSpec,
    photos: usize,
    seed: u64,
) -> Result<Vec<(Perturbation, f64)>, ToolError> {
    let mut rng = fixtures::SplitMix(seed);
    let mut out = Vec::new();
    for p in Perturbation::ALL {
        let mut right = 0;
        for n in 0..photos {
            let card = rng.range(0, spec.cards as u64) as usize;
            let photo = perturb(&card_image(card, 0), p, seed ^ (n as u64 * 7919));
            let r = rec.recognize(&[photo], &[Instant::now()])?;
            if r[0].card_id.as_deref() == Some(spec.card_id(card).as_str()) {
                right += 1;
            }
        }
        out.push((p, right as f64 / photos as f64));
    }
    Ok(out)
}

/// `n` JPEG photos of cards spread over `spec`, with sensor noise.
pub(crate) fn noisy_photos(spec: &ReferenceSpec, n: usize) -> Vec<bytes::Bytes> {
    (0..n)
        .map(|i| {
            bytes::Bytes::from(fixtures::encode_jpeg(
                &perturb(
                    &card_image(i * 13 % spec.cards, 0),
                    Perturbation::Noise,
                    i as u64,
                ),
                85,
            ))
        })
        .collect()
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The accuracy configuration the test suite holds to (printed by the benchmark too).
pub const TEST_CARDS: usize = 400;
pub const TEST_PHOTOS: usize = 60;
pub const TEST_SEED: u64 = 2026;

pub async fn run(full: bool) -> Result<(), ToolError> {
    let work = tempfile::Builder::new()
        .prefix("deckhand-bench-")
        .tempdir()
        .map_err(ToolError::TempDir)?;
    println!(
        "recognizer benchmark (cpu backend: XNNPACK {}, tract for models it cannot run), {} cores",
        match deckhand_agent::recognizer::xnnpack::available() {
            Ok(()) => "installed".to_string(),
            Err(e) => format!("not used: {e}"),
        },
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // 1. Accuracy in the test suite's configuration.
    let spec = ReferenceSpec::small(TEST_CARDS);
    let files = fixtures::write_reference_release(&work.path().join("small"), &spec)?;
    let rec = load(&files, &spec, 1)?;
    println!(
        "\n  accuracy, {} cards / {} rows, {TEST_PHOTOS} photos per perturbation (test configuration):",
        spec.cards, spec.rows
    );
    for (p, acc) in accuracy(&rec, &spec, TEST_PHOTOS, TEST_SEED)? {
        println!("    {:<12} top-1 {:>6.1}%", format!("{p:?}"), acc * 100.0);
    }
    drop(rec);

    // 2. The seeds' size: 17,592 x 768.
    let spec = if full {
        ReferenceSpec::full()
    } else {
        ReferenceSpec {
            cards: 2000,
            rows: 2200,
            ..ReferenceSpec::full()
        }
    };
    let t = Instant::now();
    let files = fixtures::write_reference_release(&work.path().join("full"), &spec)?;
    println!(
        "\n  reference DB {} rows x {} dims ({} cards) generated in {:.1} s",
        spec.rows,
        spec.dim,
        spec.cards,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let rec = load(&files, &spec, 1)?;
    let first = rec.recognize(&[card_image(7, 0)], &[Instant::now()])?;
    let cold = t.elapsed();
    println!(
        "  cold start to first answer: {:.0} ms (load model, view index, parse labels and metadata, recognise)",
        cold.as_secs_f64() * 1000.0
    );
    if first[0].card_id.as_deref() != Some(spec.card_id(7).as_str()) {
        println!("  (first answer was {:?})", first[0].card_id);
    }
    println!("  accuracy at this size, 100 photos per perturbation:");
    for (p, acc) in accuracy(&rec, &spec, 100, 99)? {
        println!("    {:<12} top-1 {:>6.1}%", format!("{p:?}"), acc * 100.0);
    }

    search_alone(&files, &spec)?;

    // Where the time of one recognition goes, on the sample model and on an EfficientNet-Lite0-shaped one.
    stages(&rec, &files, &spec, work.path())?;

    through_the_service(rec, &files, &spec).await
}

/// usearch's search alone, over the benchmark's reference DB.
fn search_alone(
    files: &deckhand_agent::release::ReleaseFiles,
    spec: &ReferenceSpec,
) -> Result<(), ToolError> {
    let index = usearch::Index::restore(
        files
            .index
            .to_str()
            .ok_or_else(|| ToolError::NotUtf8(files.index.clone()))?,
    )
    .map_err(|e| ToolError::Usearch(e.to_string()))?;
    let mut rng = fixtures::SplitMix(3);
    let queries: Vec<Vec<f32>> = (0..2000)
        .map(|_| (0..spec.dim).map(|_| rng.normal()).collect())
        .collect();
    let t = Instant::now();
    for q in &queries {
        index
            .search(q, 32)
            .map_err(|e| ToolError::Usearch(e.to_string()))?;
    }
    let per = t.elapsed() / queries.len() as u32;
    println!(
        "  usearch search (k=32) over {} x {}: {:.1} us per query",
        spec.rows,
        spec.dim,
        per.as_secs_f64() * 1e6
    );
    Ok(())
}

/// Throughput and latency through the service (queue, batching, inference thread), steady and while
/// releases are swapped in the background.
async fn through_the_service(
    rec: deckhand_agent::recognizer::Recognizer,
    files: &deckhand_agent::release::ReleaseFiles,
    spec: &ReferenceSpec,
) -> Result<(), ToolError> {
    let (cores, _) = Cores::new(0);
    println!(
        "\n  through the service (queue, batching, the inference thread on {} cores, as the agent's default):",
        cores.threads()
    );
    let service =
        Service::start(Arc::new(Metrics::default()), cores).map_err(ToolError::Service)?;
    service.activate(rec, &[])?;
    let photos = noisy_photos(spec, 64);
    let steady = load_test(&service, &photos, 4, Duration::from_secs(4), None).await;
    println!(
        "  cpu: {:.1} recognitions/s with 4 clients; latency p50 {:.1} ms, p99 {:.1} ms",
        steady.len() as f64 / 4.0,
        percentile(&steady, 0.5).as_secs_f64() * 1000.0,
        percentile(&steady, 0.99).as_secs_f64() * 1000.0
    );

    // p99 while releases are swapped in the background.
    let next = load(files, spec, 2)?;
    let swapping = load_test(
        &service,
        &photos,
        4,
        Duration::from_secs(4),
        Some((files.clone(), spec.clone(), next)),
    )
    .await;
    println!(
        "  during swaps (a new release activated every 500 ms): p50 {:.1} ms, p99 {:.1} ms (steady p99 {:.1} ms)",
        percentile(&swapping, 0.5).as_secs_f64() * 1000.0,
        percentile(&swapping, 0.99).as_secs_f64() * 1000.0,
        percentile(&steady, 0.99).as_secs_f64() * 1000.0
    );
    service.shutdown();
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median per-stage times of `rec` over `runs` passes of `batch` decoded images.
fn stage_times(
    rec: &Recognizer,
    images: &[image::RgbImage],
    batch: usize,
    runs: usize,
) -> Result<[Duration; 3], ToolError> {
    let (mut pre, mut emb, mut search) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let picked: Vec<_> = (0..batch)
            .map(|i| images[(r * batch + i) % images.len()].clone())
            .collect();
        let starts = vec![Instant::now(); batch];
        let (_, t) = rec.recognize_timed(&picked, &starts)?;
        pre.push(t.preprocess / batch as u32);
        emb.push(t.embed / batch as u32);
        search.push(t.search / batch as u32);
    }
    Ok([median(pre), median(emb), median(search)])
}

/// Prints the median time of each stage: decode (for a card photo and for a camera frame), resize and
/// normalise, embed, search. On the sample model, then on a generated EfficientNet-Lite0-shaped model
/// over the same index.
fn stages(
    sample: &Recognizer,
    files: &ReleaseFiles,
    spec: &ReferenceSpec,
    work: &std::path::Path,
) -> Result<(), ToolError> {
    const RUNS: usize = 30;
    let photo = perturb(&card_image(11, 0), Perturbation::Noise, 1);
    let frame = image::imageops::resize(&photo, 1280, 960, image::imageops::FilterType::Triangle);
    let mut decode = Vec::new();
    for (name, img) in [
        ("card photo 252x352", &photo),
        ("camera frame 1280x960", &frame),
    ] {
        let jpeg = fixtures::encode_jpeg(img, 85);
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            deckhand_agent::recognizer::preprocess::decode(&jpeg)
                .map_err(|e| ToolError::Backend(BackendError::Run(e.to_string())))?;
            times.push(t.elapsed());
        }
        decode.push(format!(
            "{name} JPEG ({} KiB) {:.2} ms",
            jpeg.len() / 1024,
            ms(median(times))
        ));
    }
    println!("\n  per-stage median times (one core for the model; {RUNS} passes each):");
    println!("    decode: {}", decode.join("; "));

    let lite0 = work.join("lite0.onnx");
    let t = Instant::now();
    let bytes = fixtures::efficientnet_lite0_onnx(spec.dim, 7);
    std::fs::write(&lite0, &bytes).map_err(|source| ToolError::Io {
        what: "writing the generated model",
        path: lite0.clone(),
        source,
    })?;
    let mut lite_paths = paths(files);
    lite_paths.onnx = lite0;
    let lite = Recognizer::load(
        &lite_paths,
        &reference_settings(spec.dim),
        9,
        BlobId::of(b"lite0"),
        BackendChoice::Cpu,
    )?;
    let lite_load = t.elapsed();

    let images: Vec<image::RgbImage> = (0..8)
        .map(|i| {
            perturb(
                &card_image(i * 17 % spec.cards, 0),
                Perturbation::Noise,
                i as u64,
            )
        })
        .collect();
    let one = Cores::one();
    for (name, rec) in [
        ("sample model (pool + projection)".to_string(), sample),
        (
            format!(
                "EfficientNet-Lite0-shaped ({} MBConv, {:.1} MB ONNX, generated and planned in {:.1} s)",
                crate::shop::onnx::LITE0_BLOCKS,
                bytes.len() as f64 / 1e6,
                lite_load.as_secs_f64()
            ),
            &lite,
        ),
    ] {
        println!("    {name}, on {}:", rec.engine());
        for batch in [1, deckhand_agent::recognizer::MAX_BATCH] {
            let [pre, emb, search] = one.run(|| stage_times(rec, &images, batch, RUNS))?;
            println!(
                "      batch {batch}, per image: resize+normalise {:.2} ms, embed {:.2} ms, search {:.3} ms over {} rows",
                ms(pre),
                ms(emb),
                ms(search),
                rec.rows()
            );
        }
    }
    let jpegs: Vec<Vec<u8>> = images
        .iter()
        .map(|i| fixtures::encode_jpeg(i, 85))
        .collect();
    against_onnxruntime(&lite, &lite_paths.onnx, &jpegs, work)?;
    where_the_embed_goes(&lite_paths.onnx, &reference_settings(spec.dim))
}

/// The EfficientNet-Lite0-shaped model's embed time on one core by tract operator, over `RUNS` runs:
/// where tract spends it; and the embed with the depthwise convolutions as exported.
fn where_the_embed_goes(
    model: &std::path::Path,
    settings: &deckhand_protocol::manifest::RecognizerSettings,
) -> Result<(), ToolError> {
    use deckhand_agent::recognizer::cpu::{DepthwiseLayout, image_shape, plan_model};
    const RUNS: u32 = 20;
    let shape = image_shape(settings);
    let (plan, moved) = plan_model(model, "onnx", &shape, DepthwiseLayout::Chosen)?;
    let (exported, _) = plan_model(model, "onnx", &shape, DepthwiseLayout::AsExported)?;
    let (total, by_op) = embed_by_op(&plan, &shape, RUNS)?;
    let (total_exported, _) = embed_by_op(&exported, &shape, RUNS)?;
    let depthwise = plan
        .model()
        .nodes
        .iter()
        .filter(|n| n.op().name() == "DepthWiseConv")
        .count();
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by_key(|(_, (d, _))| std::cmp::Reverse(*d));
    println!(
        "\n  where tract, the engine for models XNNPACK cannot run, spends that embed on one core ({:.1} ms a \
         run over {RUNS}; tract has {} depthwise \
         kernel for this machine; {moved} of {depthwise} depthwise convolutions moved channel-last, the \
         strided ones and those under 8 wide; all as exported: {:.1} ms):",
        ms(total / RUNS),
        if deckhand_agent::recognizer::cpu::vectorised_depthwise() {
            "a vectorised"
        } else {
            "no vectorised"
        },
        ms(total_exported / RUNS)
    );
    for (op, (d, n)) in ops.iter().take(5) {
        println!(
            "    {op:<24} {:>6.2} ms ({:>4.1}%), {} nodes",
            ms(*d / RUNS),
            d.as_secs_f64() / total.as_secs_f64() * 100.0,
            n / RUNS
        );
    }
    Ok(())
}

/// `runs` embeds of a mid-grey image by `plan` on this thread (after two to warm up): their total time
/// and each operator's (time, nodes run).
#[allow(clippy::type_complexity)]
fn embed_by_op(
    plan: &deckhand_agent::recognizer::cpu::Plan,
    shape: &[usize],
    runs: u32,
) -> Result<
    (
        Duration,
        std::collections::BTreeMap<String, (Duration, u32)>,
    ),
    ToolError,
> {
    use tract_onnx::prelude::*;
    use tract_onnx::tract_core::plan::{SimpleState, eval};
    let run_error = |e: TractError| ToolError::Backend(BackendError::Run(e.to_string()));
    let input =
        Tensor::from_shape(shape, &vec![0.5f32; shape.iter().product()]).map_err(run_error)?;
    let mut by_op: std::collections::BTreeMap<String, (Duration, u32)> = Default::default();
    let mut total = Duration::ZERO;
    for run in 0..runs + 2 {
        let mut state = SimpleState::new(plan).map_err(run_error)?;
        let t = Instant::now();
        state
            .run_plan_with_eval(
                tvec!(input.clone().into()),
                |ctx, op_state, node, inputs| {
                    let t = Instant::now();
                    let out = eval(ctx, op_state, node, inputs);
                    if run >= 2 {
                        let e = by_op.entry(node.op().name().to_string()).or_default();
                        e.0 += t.elapsed();
                        e.1 += 1;
                    }
                    out
                },
            )
            .map_err(run_error)?;
        if run >= 2 {
            total += t.elapsed();
        }
    }
    Ok((total, by_op))
}

/// One image at a time, decode + resize and normalise + embed, median per image over `RUNS` passes:
/// (total, embed).
fn per_image(
    rec: &Recognizer,
    jpegs: &[Vec<u8>],
    cores: &Cores,
) -> Result<(Duration, Duration), ToolError> {
    const RUNS: usize = 40;
    let (mut total, mut embed) = (Vec::new(), Vec::new());
    cores.run(|| {
        for r in 0..RUNS + 3 {
            let t = Instant::now();
            let img = deckhand_agent::recognizer::preprocess::decode(&jpegs[r % jpegs.len()])
                .map_err(|e| ToolError::Backend(BackendError::Run(e.to_string())))?;
            let decoded = t.elapsed();
            let (_, times) = rec.recognize_timed(&[img], &[Instant::now()])?;
            if r >= 3 {
                total.push(decoded + times.preprocess + times.embed);
                embed.push(times.embed);
            }
        }
        Ok::<_, ToolError>(())
    })?;
    Ok((median(total), median(embed)))
}

/// The onnxruntime anchor's figures for one thread count.
#[derive(serde::Deserialize)]
struct Anchor {
    threads: usize,
    version: String,
    infer_ms: f64,
    total_ms: f64,
}

/// The EfficientNet-Lite0-shaped model on the agent's CPU engine beside onnxruntime on the same model file and photos,
/// on one core and on all: decode, resize and normalise, embed. onnxruntime runs in a Python helper
/// (`onnxruntime_anchor.py`) with `$DECKHAND_PYTHON` or `python3`; where it cannot be imported the
/// bench says so and prints deckhand's figures alone.
fn against_onnxruntime(
    lite: &Recognizer,
    model: &std::path::Path,
    jpegs: &[Vec<u8>],
    work: &std::path::Path,
) -> Result<(), ToolError> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut counts = vec![1];
    if all > 1 {
        counts.push(all);
    }
    let anchors = onnxruntime(model, jpegs, &counts, work);
    let version = match &anchors {
        Ok(a) => a.first().map_or("?", |a| a.version.as_str()),
        Err(_) => "-",
    };
    println!(
        "\n  EfficientNet-Lite0-shaped, one image at a time: decode + resize and normalise + embed, median \
         (deckhand: {}; anchor: onnxruntime {version}, Pillow and numpy, same model file and photos)",
        lite.engine()
    );
    for threads in counts {
        let (cores, refused) = Cores::new(threads);
        if let Some(e) = refused {
            println!("    {threads} threads: no pool ({e})");
            continue;
        }
        let (total, embed) = per_image(lite, jpegs, &cores)?;
        let anchor = anchors
            .as_ref()
            .ok()
            .and_then(|a| a.iter().find(|a| a.threads == threads));
        match anchor {
            Some(a) => println!(
                "    {threads} thread{}: deckhand {:.1} ms (embed {:.1}), onnxruntime {:.1} ms (infer {:.1}): {:.2}x",
                if threads == 1 { " " } else { "s" },
                ms(total),
                ms(embed),
                a.total_ms,
                a.infer_ms,
                ms(total) / a.total_ms
            ),
            None => println!(
                "    {threads} thread{}: deckhand {:.1} ms (embed {:.1})",
                if threads == 1 { " " } else { "s" },
                ms(total),
                ms(embed)
            ),
        }
    }
    if let Err(why) = anchors {
        println!("    onnxruntime not measured: {why}");
    }
    Ok(())
}

/// Runs the onnxruntime helper: one figure per thread count, or why there are none.
fn onnxruntime(
    model: &std::path::Path,
    jpegs: &[Vec<u8>],
    counts: &[usize],
    work: &std::path::Path,
) -> Result<Vec<Anchor>, String> {
    let mut photos = Vec::new();
    for (i, jpeg) in jpegs.iter().enumerate() {
        let path = work.join(format!("photo-{i}.jpg"));
        std::fs::write(&path, jpeg).map_err(|e| format!("writing {}: {e}", path.display()))?;
        photos.push(path);
    }
    let mut args: Vec<std::ffi::OsString> = vec![model.into(), "40".into()];
    args.extend(counts.iter().map(|c| c.to_string().into()));
    args.push("--".into());
    args.extend(photos.into_iter().map(Into::into));
    let lines = super::python_helper(
        "onnxruntime_anchor.py",
        include_str!("onnxruntime_anchor.py"),
        &args,
        work,
        "pip install onnxruntime numpy pillow",
    )?;
    let mut anchors = Vec::new();
    for v in lines {
        anchors.push(
            serde_json::from_value(v.clone())
                .map_err(|e| format!("the helper printed {v}: {e}"))?,
        );
    }
    Ok(anchors)
}

/// Runs `clients` concurrent clients for `dur`; returns sorted latencies. With `swap`, a loader thread
/// activates freshly loaded releases every 500 ms meanwhile.
pub(crate) async fn load_test(
    service: &Service,
    photos: &[bytes::Bytes],
    clients: usize,
    dur: Duration,
    swap: Option<(ReleaseFiles, ReferenceSpec, Recognizer)>,
) -> Vec<Duration> {
    let stop = Instant::now() + dur;
    let swapper = swap.map(|(files, spec, first)| {
        let service = service.clone();
        std::thread::spawn(move || {
            let mut candidate = Some(first);
            let mut version = 2;
            while Instant::now() < stop {
                if let Some(c) = candidate.take() {
                    let _ = service.activate(c, &[]);
                }
                std::thread::sleep(Duration::from_millis(500));
                version += 1;
                candidate = load(&files, &spec, version).ok();
            }
        })
    });
    let mut tasks = Vec::new();
    for c in 0..clients {
        let service = service.clone();
        let photos = photos.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while Instant::now() < stop {
                let t = Instant::now();
                if service
                    .recognize(photos[i % photos.len()].clone())
                    .await
                    .is_ok()
                {
                    lat.push(t.elapsed());
                }
                i += clients;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    if let Some(s) = swapper {
        let _ = s.join();
    }
    all.sort();
    all
}
