//! The Rust image processor reproduces transformers' Idefics3 PIL processor and Pillow bit for bit
//! (fixtures written by scripts/reference/processor_images.py; see its docstring for the keys).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use ferrovlm::data::image::{decode_image, decode_image_file, process, ImageProcessorConfig, RawImage, Transparency};
use ferrovlm::data::resample::{resize, Filter, ImageView};
use ferrovlm::error::{DataError, Error};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/processor_images")
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

fn npz(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_npz(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}
fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// `RawImage::from_pil` from a PIL record (mode, size, tobytes, palette, transparency).
fn from_record(rec: &Value, key: &str, arrays: &HashMap<String, Tensor>) -> RawImage {
    let mode = rec["mode"].as_str().unwrap();
    let w = rec["size"][0].as_u64().unwrap() as usize;
    let h = rec["size"][1].as_u64().unwrap() as usize;
    let bytes = u8s(&arrays[&format!("{key}_bytes")]);
    let pal = arrays.get(&format!("{key}_palette")).map(u8s);
    let mut img = RawImage::from_pil(mode, w, h, bytes, pal, rec["palette_mode"].as_str()).unwrap();
    let t = &rec["transparency"];
    img.transparency = if let Some(v) = t.get("int") {
        Some(Transparency::Value(v.as_i64().unwrap()))
    } else if let Some(v) = t.get("rgb") {
        let c: Vec<i64> = v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        Some(Transparency::Rgb(c[0], c[1], c[2]))
    } else {
        t.get("bytes").map(|k| Transparency::PaletteAlpha(u8s(&arrays[k.as_str().unwrap()])))
    };
    img
}

/// How the test obtains an input image.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// Decode the file (TIFF CMYK falls back to the PIL record: the `image` crate converts CMYK itself).
    File,
    /// The PIL record where there is one (non-RGB images), else the file.
    Pil,
}

fn load(name: &str, src: Source, m: &Value, pil: &HashMap<String, Tensor>) -> RawImage {
    let rec = &m["pil_inputs"][name];
    if !rec.is_null() && (src == Source::Pil || name.ends_with(".tiff")) {
        return from_record(rec, name, pil);
    }
    decode_image_file(&dir().join("images").join(name), None).unwrap()
}

fn check_processor(src: Source) {
    let m = meta();
    let pil = npz(&dir().join("pil_inputs.npz"));
    let cases = m["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = ImageProcessorConfig::from_json(&case["config"]).unwrap();
        let images: Vec<Vec<RawImage>> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(|f| load(f.as_str().unwrap(), src, &m, &pil)).collect())
            .collect();
        let out = process(&images, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let exp = npz(&dir().join("processor").join(format!("{name}.npz")));
        let mask_t = &exp["pixel_attention_mask"];
        let dims = mask_t.dims().to_vec();
        assert_eq!(dims, [out.batch, out.max_frames, out.height, out.width], "{name}: shape [B,F,H,W]");
        let want_mask: Vec<bool> = u8s(mask_t).iter().map(|&v| v != 0).collect();
        assert_eq!(out.pixel_attention_mask.as_deref(), Some(&want_mask[..]), "{name}: pixel_attention_mask");
        let want: Vec<f32> = if let Some(pv) = exp.get("pixel_values") {
            f32s(pv)
        } else {
            // pixel_u8 + value_table (exactness of this encoding is asserted by the generator).
            let table = f32s(&exp["value_table"]);
            let u = u8s(&exp["pixel_u8"]);
            let plane = out.height * out.width;
            u.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let frame = i / (3 * plane);
                    let c = (i / plane) % 3;
                    if want_mask[frame * plane + i % plane] {
                        table[c * 256 + v as usize]
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        assert_eq!(want.len(), out.pixel_values.len(), "{name}: pixel_values length");
        let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i].to_bits() != out.pixel_values[i].to_bits()).collect();
        if !bad.is_empty() {
            let max = bad.iter().map(|&i| (want[i] - out.pixel_values[i]).abs()).fold(0f32, f32::max);
            failures.push(format!(
                "{name}: {} of {} values differ (max abs diff {max}, first at {})",
                bad.len(),
                want.len(),
                bad[0]
            ));
        }
        let rows: Vec<i64> = out.rows.iter().flatten().map(|&r| r as i64).collect();
        let cols: Vec<i64> = out.cols.iter().flatten().map(|&c| c as i64).collect();
        assert_eq!(rows, i64s(&exp["rows"]), "{name}: rows");
        assert_eq!(cols, i64s(&exp["cols"]), "{name}: cols");
        let per: Vec<i64> = out.rows.iter().map(|r| r.len() as i64).collect();
        assert_eq!(per, i64s(&exp["images_per_sample"]), "{name}: images per sample");
    }
    assert!(failures.is_empty(), "pixel_values not bit-identical:\n{}", failures.join("\n"));
}

#[test]
fn processor_matches_transformers_on_decoded_files() {
    check_processor(Source::File);
}

#[test]
fn processor_matches_transformers_on_pil_inputs() {
    check_processor(Source::Pil);
}

#[test]
fn resize_matches_pillow() {
    let m = meta();
    let arrays = npz(&dir().join("resize.npz"));
    let mut failures = Vec::new();
    for r in m["resize"].as_array().unwrap() {
        let key = r["key"].as_str().unwrap();
        let filter = Filter::from_pil(r["filter"].as_i64().unwrap()).unwrap();
        let (inp, out) = (&arrays[&format!("{key}_in")], &arrays[&format!("{key}_out")]);
        let (h, w, c) = inp.dims3().unwrap();
        let (nh, nw, _) = out.dims3().unwrap();
        let data = u8s(inp);
        let got = resize(ImageView::new(w, h, c, &data).unwrap(), nw, nh, filter).unwrap();
        let want = u8s(out);
        let diff = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        if diff > 0 || got.data.len() != want.len() {
            failures.push(format!("{key} {filter:?} {w}x{h}x{c} -> {nw}x{nh}: {diff} bytes differ"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn convert_to_rgb_matches_transformers() {
    let m = meta();
    let arrays = npz(&dir().join("convert.npz"));
    for rec in m["convert"].as_array().unwrap() {
        let key = rec["key"].as_str().unwrap();
        let img = from_record(rec, key, &arrays);
        let got = img.to_rgb().unwrap();
        let want = u8s(&arrays[&format!("{key}_out")]);
        let diff = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(diff == 0 && got.data.len() == want.len(), "{key}: {diff} bytes differ");
    }
}

#[test]
fn decode_matches_pillow() {
    let arrays = npz(&dir().join("decode.npz"));
    let mut names: Vec<&String> = arrays.keys().filter(|k| !k.ends_with("_load")).collect();
    names.sort();
    assert!(names.len() >= 10);
    let mut report = Vec::new();
    for name in names {
        let img = decode_image_file(&dir().join("images").join(name), None).unwrap();
        for (got, key) in [(img.to_rgb().unwrap(), name.clone()), (img.to_rgb_plain().unwrap(), format!("{name}_load"))]
        {
            let want = u8s(&arrays[&key]);
            let (h, w, _) = arrays[&key].dims3().unwrap();
            assert_eq!((got.width, got.height), (w, h), "{key}: size (EXIF orientation applied?)");
            let max = got.data.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            // Lossy formats are decoded by other libraries than Pillow's (see image_decode.rs).
            let exact_expected = name.ends_with(".png");
            if exact_expected {
                assert_eq!(max, 0, "{key}: decoded pixels differ from Pillow's");
            } else {
                report.push(format!("{key}: max abs diff vs Pillow {max}"));
                assert!(max <= 48, "{key}: decoded pixels far from Pillow's (max diff {max})");
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

// ------------------------------------------------------------------------------------------------
// Bad input: typed errors that say what is wrong, never a panic.

fn data_msg(e: Error) -> String {
    match e {
        Error::Data(DataError::Image(m)) | Error::Data(DataError::Invalid(m)) => m,
        other => panic!("expected a DataError, got {other:?}"),
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut chunk = kind.to_vec();
    chunk.extend(data);
    out.extend(&chunk);
    out.extend(crc32(&chunk).to_be_bytes());
}

/// A PNG signature + IHDR claiming `w` x `h` RGB + the start of an IDAT chunk, then nothing.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut v, b"IHDR", &ihdr);
    png_chunk(&mut v, b"IDAT", &[0x78, 0x9c, 0x01, 0x00]);
    v
}

#[test]
fn bad_bytes_are_typed_errors() {
    let png = std::fs::read(dir().join("images/rgb_37x53.png")).unwrap();
    let truncated = decode_image(&png[..png.len() / 2], None).unwrap_err();
    let msg = data_msg(truncated);
    assert!(msg.contains("Png") && msg.contains("37x53"), "{msg}");
    let msg = data_msg(decode_image(b"definitely not an image at all", None).unwrap_err());
    assert!(msg.contains("unknown image format"), "{msg}");
    let msg = data_msg(decode_image(&[], None).unwrap_err());
    assert!(msg.contains("empty"), "{msg}");
    let msg = data_msg(decode_image(&png[..20], None).unwrap_err());
    assert!(msg.contains("header"), "{msg}");
    let jpg = std::fs::read(dir().join("images/jpeg_64x48.jpg")).unwrap();
    for cut in [2, 100, jpg.len() / 2, jpg.len() - 3] {
        // Truncated JPEGs either fail cleanly or decode partially (as libjpeg does); never panic.
        let _ = decode_image(&jpg[..cut], None);
    }
    let mut garbage = png.clone();
    for b in garbage.iter_mut().skip(60).step_by(7) {
        *b ^= 0x5a;
    }
    assert!(decode_image(&garbage, None).is_err());
    let msg = data_msg(decode_image_file(&dir().join("images/missing.png"), None).unwrap_err());
    assert!(msg.contains("missing.png"), "{msg}");
}

#[test]
fn decompression_bomb_guard() {
    let png = std::fs::read(dir().join("images/rgb_37x53.png")).unwrap();
    let msg = data_msg(decode_image(&png, Some(1000)).unwrap_err());
    assert!(msg.contains("37x53") && msg.contains("1961") && msg.contains("1000"), "{msg}");
    assert!(decode_image(&png, Some(37 * 53)).is_ok());
    // Header claims 100000 x 100000: rejected from the header alone (default limit).
    let msg = data_msg(decode_image(&png_header(100_000, 100_000), None).unwrap_err());
    assert!(msg.contains("100000x100000") && msg.contains("178956970"), "{msg}");
    let msg = data_msg(decode_image(&png_header(0, 5), None).unwrap_err());
    assert!(msg.contains("header") || msg.contains("empty"), "{msg}");
}

#[test]
fn bad_images_name_their_index() {
    let cfg = ImageProcessorConfig::from_json(&serde_json::json!({
        "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}
    }))
    .unwrap();
    let ok = RawImage::from_rgb8(1, 1, vec![9, 8, 7]).unwrap();
    let out = process(&[vec![ok.clone()]], &cfg).unwrap();
    assert_eq!((out.max_frames, out.rows[0][0], out.cols[0][0]), (5, 2, 2));

    let mut empty = ok.clone();
    empty.width = 0;
    empty.data.clear();
    let msg = data_msg(process(&[vec![ok.clone()], vec![ok.clone(), empty]], &cfg).unwrap_err());
    assert!(msg.contains("sample 1, image 1") && msg.contains("empty"), "{msg}");

    let mut short = ok.clone();
    short.data.pop();
    let msg = data_msg(process(&[vec![short]], &cfg).unwrap_err());
    assert!(msg.contains("sample 0, image 0") && msg.contains("bytes"), "{msg}");

    let mut pal = RawImage::from_pil("P", 2, 1, vec![0, 1], Some(vec![1, 2, 3, 4, 5, 6]), None).unwrap();
    pal.palette = None;
    let msg = data_msg(process(&[vec![], vec![ok.clone(), pal]], &cfg).unwrap_err());
    assert!(msg.contains("sample 1, image 1") && msg.contains("palette"), "{msg}");
    let msg = data_msg(RawImage::from_pil("P", 2, 1, vec![0, 1], None, None).unwrap_err());
    assert!(msg.contains("no palette"), "{msg}");
    let msg = data_msg(RawImage::from_pil("RGB", 2, 2, vec![0; 5], None, None).unwrap_err());
    assert!(msg.contains("2x2") && msg.contains("12"), "{msg}");
    let msg = data_msg(RawImage::from_pil("HSV", 1, 1, vec![0; 3], None, None).unwrap_err());
    assert!(msg.contains("HSV"), "{msg}");

    let msg = data_msg(process(&[vec![], vec![]], &cfg).unwrap_err());
    assert!(msg.contains("no images"), "{msg}");
    let mut no_rgb = cfg.clone();
    no_rgb.do_convert_rgb = false;
    let l = RawImage::from_pil("L", 2, 2, vec![1; 4], None, None).unwrap();
    let msg = data_msg(process(&[vec![l]], &no_rgb).unwrap_err());
    assert!(msg.contains("sample 0, image 0") && msg.contains("do_convert_rgb"), "{msg}");

    // Extreme aspect ratios and one-pixel images go through without panicking.
    let thin = RawImage::from_rgb8(1, 3000, vec![100; 9000]).unwrap();
    let out = process(&[vec![thin, ok]], &cfg).unwrap();
    assert_eq!(out.rows[0], [2, 2]);
}

#[test]
fn unpadded_batches_need_equal_frames() {
    let mut cfg = ImageProcessorConfig::from_json(&serde_json::json!({
        "size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "do_pad": false
    }))
    .unwrap();
    let img = RawImage::from_rgb8(3, 2, vec![50; 18]).unwrap();
    let out = process(&[vec![img.clone()], vec![img.clone()]], &cfg).unwrap();
    assert!(out.pixel_attention_mask.is_none());
    assert_eq!((out.batch, out.max_frames), (2, 5));
    assert!(process(&[vec![img.clone()], vec![]], &cfg).is_err());
    cfg.do_pad = true;
    let out = process(&[vec![img.clone()], vec![]], &cfg).unwrap();
    let plane = out.height * out.width;
    assert!(out.pixel_values[5 * 3 * plane..].iter().all(|&v| v == 0.0));
    assert!(out.pixel_attention_mask.unwrap()[5 * plane..].iter().all(|&m| !m));
}

/// Process CPU time (user + system) in ms, from /proc/self/stat (Linux; 0 elsewhere).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks * 10.0 // USER_HZ = 100
}

/// Runs `f` `n` times; returns (median wall ms, CPU ms per run).
fn timed(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut wall = Vec::new();
    let c0 = cpu_ms();
    for _ in 0..n {
        let t = std::time::Instant::now();
        f();
        wall.push(t.elapsed().as_secs_f64() * 1e3);
    }
    wall.sort_by(f64::total_cmp);
    (wall[n / 2], (cpu_ms() - c0) / n as f64)
}

/// `cargo test --release --test image_processor bench_ -- --ignored --nocapture --test-threads=1`:
/// one 640x480 RGB photo-sized image, splitting on, SmolVLM-256M sizes (2048 / 512): 13 frames.
#[test]
#[ignore]
fn bench_640x480_split_2048_512() {
    let cfg = ImageProcessorConfig::from_json(&serde_json::json!({
        "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 1
    }))
    .unwrap();
    let data: Vec<u8> = (0..640 * 480 * 3).map(|i: usize| ((i * 2654435761) >> 13) as u8).collect();
    let img = RawImage::from_rgb8(640, 480, data).unwrap();
    let batch = vec![vec![img]];
    let (wall, cpu) = timed(20, || {
        let out = process(&batch, &cfg).unwrap();
        assert_eq!((out.max_frames, out.rows[0][0], out.cols[0][0]), (13, 3, 4));
    });
    eprintln!(
        "640x480 -> 13 x 512x512 frames: median wall {wall:.1} ms, CPU {cpu:.1} ms per image ({} threads)",
        rayon::current_num_threads()
    );
}

#[test]
#[ignore]
fn bench_parts() {
    let data: Vec<u8> = (0..640 * 480 * 3).map(|i: usize| ((i * 2654435761) >> 13) as u8).collect();
    let v = ImageView::new(640, 480, 3, &data).unwrap();
    let big = resize(v, 2048, 1536, Filter::Lanczos).unwrap();
    let cases: [(&str, ImageView<'_>, usize, usize); 6] = [
        ("up 640x480 -> 2048x1536", v, 2048, 1536),
        ("up, width only -> 2048x480", v, 2048, 480),
        ("up, height only -> 640x1536", v, 640, 1536),
        ("down 2048x1536 -> 512x512", big.view(), 512, 512),
        ("down, width only -> 512x1536", big.view(), 512, 1536),
        ("down, height only -> 2048x512", big.view(), 2048, 512),
    ];
    for (what, src, w, h) in cases {
        let (wall, cpu) = timed(10, || {
            resize(src, w, h, Filter::Lanczos).unwrap();
        });
        eprintln!("{what}: median wall {wall:.1} ms, CPU {cpu:.1} ms");
    }
    let cfg = ImageProcessorConfig::from_json(&serde_json::json!({
        "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "do_resize": false
    }))
    .unwrap();
    let batch = vec![vec![RawImage::from_rgb8(2048, 1536, big.data.clone()).unwrap()]];
    let (wall, cpu) = timed(10, || {
        process(&batch, &cfg).unwrap();
    });
    eprintln!("process without the first resize: median wall {wall:.1} ms, CPU {cpu:.1} ms");
}
