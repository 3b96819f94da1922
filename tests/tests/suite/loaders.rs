//! The release loaders and the image preprocessing, on files the project's own fixtures write: the seeds'
//! label and metadata forms, .npy and HEF headers, the sample ONNX model, usearch headers, images.

use deckhand_tools::shop::fixtures;

mod release_files {
    use super::fixtures;
    use deckhand_protocol::manifest::{ChannelLayout, Metric};

    use deckhand_agent::release::loaders::*;

    #[test]
    fn labels_in_both_seed_forms() {
        assert_eq!(
            parse_labels(br#"["a", "b", 7]"#).unwrap(),
            vec!["a", "b", "7"]
        );
        assert_eq!(
            parse_labels(br#"{"1": "b", "0": "a"}"#).unwrap(),
            vec!["a", "b"]
        );
        assert!(
            parse_labels(br#"{"0": "a", "2": "c"}"#)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        assert!(
            parse_labels(br#"{"x": "a"}"#)
                .unwrap_err()
                .to_string()
                .contains("not a row number")
        );
        assert!(
            parse_labels(br#"["a", null]"#)
                .unwrap_err()
                .to_string()
                .contains("row 1")
        );
        assert!(
            parse_labels(br#"42"#)
                .unwrap_err()
                .to_string()
                .contains("found a number")
        );
        assert!(
            parse_labels(b"{")
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn metadata_in_both_seed_forms() {
        let m = parse_metadata(br#"{"a": {"name": "A"}, "b": {"name": "B"}}"#).unwrap();
        assert_eq!(m["b"]["name"], "B");
        let m =
            parse_metadata(br#"[{"id": "a", "name": "A"}, {"card_id": 5, "name": "F"}]"#).unwrap();
        assert_eq!(m["5"]["name"], "F");
        assert!(
            parse_metadata(br#"[{"id": "a"}, {"id": "a"}]"#)
                .unwrap_err()
                .to_string()
                .contains("more than once")
        );
        assert!(
            parse_metadata(br#"[{"name": "x"}]"#)
                .unwrap_err()
                .to_string()
                .contains("entry 0")
        );
    }

    #[test]
    fn npy_headers_are_checked() {
        let npy = fixtures::npy_f32(2, 3, &[1.0; 6]);
        assert_eq!(npy_header(&npy).unwrap(), (2, 3, npy.len() - 24));
        assert!(
            npy_header(&npy[..npy.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("needs 24 bytes")
        );
        assert!(
            npy_header(b"hello world")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
    }

    #[test]
    fn hef_headers_are_checked() {
        let hef = fixtures::hef_v0(b"network description and weights");
        let h = check_hef(&hef).unwrap();
        assert_eq!(
            (h.version, h.header_size, h.checksum_verified),
            (0, 32, true)
        );
        let mut bad = hef.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(check_hef(&bad).unwrap_err().to_string().contains("MD5"));
        assert!(
            check_hef(&hef[..hef.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("follow")
        );
        assert!(
            check_hef(b"\x89PNG\r\n\x1a\n rest of a png file")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut v9 = hef.clone();
        v9[7] = 9;
        assert!(
            check_hef(&v9)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        assert!(
            check_hef(&hef[..10])
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
    }

    #[test]
    fn the_sample_onnx_model_is_inspected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, fixtures::embedding_model_onnx(224, 14, 768, 1)).unwrap();
        let info = inspect_onnx(&path).unwrap();
        assert_eq!(
            (info.layout, info.width, info.height, info.output_dim),
            (ChannelLayout::Nchw, 224, 224, 768)
        );
        assert_eq!(info.input_shape[0], None, "batch is symbolic");
        std::fs::write(&path, b"definitely not protobuf").unwrap();
        let err = inspect_onnx(&path).unwrap_err().to_string();
        assert!(
            err.starts_with("onnx ") && err.contains("does not load"),
            "{err}"
        );
    }

    #[test]
    fn usearch_headers_are_read_and_the_index_viewed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usearch.index");
        let vectors: Vec<Vec<f32>> = (0..50)
            .map(|i| (0..16).map(|j| ((i * 16 + j) as f32).sin()).collect())
            .collect();
        fixtures::write_usearch_index(&path, 16, usearch::MetricKind::Cos, &vectors).unwrap();
        let h = inspect_index(&path).unwrap();
        assert_eq!(
            (h.dimensions, h.metric, h.count, h.scalar.as_str()),
            (16, Metric::Cos, 50, "f32")
        );
        let truncated = std::fs::read(&path).unwrap();
        std::fs::write(&path, &truncated[..truncated.len() / 2]).unwrap();
        assert!(inspect_index(&path).is_err());
        std::fs::write(
            &path,
            b"garbage garbage garbage garbage garbage garbage garbage garbage",
        )
        .unwrap();
        let err = inspect_index(&path).unwrap_err().to_string();
        assert!(err.starts_with("index "), "{err}");
    }

    #[test]
    fn images_are_checked() {
        let png = fixtures::encode_png(&image::RgbImage::from_pixel(4, 3, image::Rgb([1, 2, 3])));
        assert_eq!(check_image(&png).unwrap(), (4, 3, "png"));
        assert!(
            check_image(b"not an image")
                .unwrap_err()
                .to_string()
                .contains("not an image")
        );
        assert!(
            check_image(&png[..20])
                .unwrap_err()
                .to_string()
                .contains("does not decode")
        );
    }
}

mod preprocess {
    use super::fixtures;
    use deckhand_protocol::manifest::{ChannelLayout, RecognizerSettings};
    use image::RgbImage;

    use deckhand_agent::recognizer::preprocess::*;
    use fixtures::{encode_jpeg, encode_png};

    #[test]
    fn refuses_bad_images_with_the_reason() {
        assert_eq!(decode(b""), Err(ImageError::Empty));
        assert_eq!(decode(b"hello, not an image"), Err(ImageError::NotAnImage));
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert!(matches!(decode(gif), Err(ImageError::Format(_))));
        let jpeg = encode_jpeg(&RgbImage::from_pixel(64, 48, image::Rgb([9, 9, 9])), 90);
        assert_eq!(decode(&jpeg).unwrap().dimensions(), (64, 48));
        assert!(matches!(
            decode(&jpeg[..jpeg.len() / 2]),
            Err(ImageError::Decode(_))
        ));
        // A 50-megapixel PNG is refused from its header alone.
        let big = encode_png(&RgbImage::new(8000, 6250));
        let err = decode(&big).unwrap_err();
        assert_eq!(
            err,
            ImageError::TooLarge {
                width: 8000,
                height: 6250
            }
        );
        assert!(err.to_string().contains("50 megapixels"));
    }

    #[test]
    fn tensors_follow_layout_and_normalisation() {
        let s = RecognizerSettings {
            input_width: 2,
            input_height: 1,
            layout: ChannelLayout::Nchw,
            mean: [0.5, 0.0, 0.0],
            std: [0.5, 1.0, 1.0],
            embedding_dim: 4,
            metric: deckhand_protocol::manifest::Metric::Cos,
            min_score: 0.5,
        };
        let img = RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgb([255, 0, 255])
            } else {
                image::Rgb([0, 255, 0])
            }
        });
        let mut nchw = Vec::new();
        to_tensor(&img, &s, &mut nchw);
        assert_eq!(nchw, vec![1.0, -1.0, 0.0, 1.0, 1.0, 0.0]);
        let mut nhwc = Vec::new();
        to_tensor(
            &img,
            &RecognizerSettings {
                layout: ChannelLayout::Nhwc,
                ..s
            },
            &mut nhwc,
        );
        assert_eq!(nhwc, vec![1.0, 0.0, 1.0, -1.0, 1.0, 0.0]);
    }
}

#[test]
fn the_cpu_backend_runs_a_partial_batch_as_it_is_and_embeds_like_single_images() {
    use deckhand_agent::recognizer::Embedder as _;
    let dir = tempfile::tempdir().unwrap();
    let spec = fixtures::ReferenceSpec::small(30);
    let files = fixtures::write_reference_release(dir.path(), &spec).unwrap();
    let settings = fixtures::reference_settings(spec.dim);
    let mut cpu =
        deckhand_agent::recognizer::cpu::CpuEmbedder::load(&files.onnx, &settings).unwrap();
    let dim = cpu.dim();
    let images: Vec<Vec<f32>> = [0, 7, 12]
        .iter()
        .map(|card| {
            let mut t = Vec::new();
            deckhand_agent::recognizer::preprocess::to_tensor(
                &fixtures::card_image(*card, 0),
                &settings,
                &mut t,
            );
            t
        })
        .collect();
    // Three images in one batch (not padded to a full one), and more than a full batch (run in
    // batches), give exactly one embedding each, equal to the single runs'.
    let batch = cpu.embed(&images.concat(), 3).unwrap();
    assert_eq!(batch.len(), 3 * dim);
    let eleven: Vec<f32> = (0..11).flat_map(|i| images[i % 3].clone()).collect();
    let many = cpu.embed(&eleven, 11).unwrap();
    assert_eq!(many.len(), 11 * dim);
    for (i, image) in images.iter().enumerate() {
        let single = cpu.embed(image, 1).unwrap();
        for (got, row) in [(&batch, i), (&many, i + 3)] {
            let e = &got[row * dim..(row + 1) * dim];
            let worst = e
                .iter()
                .zip(&single)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "image {i} in a batch differs by {worst}");
        }
    }
}
