//! Targets: image decoding, the image processor and preprocessor_config.json.

use super::*;

// ---------------------------------------------------------------------------------------------
// Image decoding
// ---------------------------------------------------------------------------------------------

pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Recomputes the CRC of every complete PNG chunk, so that edited chunks reach the decoder's
/// parsing instead of its checksum test.
pub(crate) fn fix_png_crcs(b: &mut [u8]) {
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let Some(end) = (i + 8).checked_add(len).filter(|&e| e + 4 <= b.len()) else { break };
        let crc = crc32(&b[i + 4..end]);
        b[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        i = end + 4;
    }
}

/// Seeds: fixture files (PNG in every mode, EXIF, 16-bit, JPEG, CMYK TIFF) and files encoded here
/// (GIF, BMP, WebP, TIFF, a 1xN PNG).
pub(crate) fn image_seeds() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("processor_images/images");
    let mut seeds: Vec<(String, Vec<u8>)> = [
        "exif6_30x20.png",
        "i16_23x19.png",
        "jpeg_64x48.jpg",
        "l_key_27x15.png",
        "la_33x20.png",
        "one_29x31.png",
        "p_key_25x20.png",
        "p_trns_40x30.png",
        "rgb_1x1.png",
        "cmyk_40x24.tiff",
    ]
    .iter()
    .map(|n| (n.to_string(), read(dir.join(n))))
    .collect();
    let img = image::RgbaImage::from_fn(9, 7, |x, y| image::Rgba([(x * 28) as u8, (y * 36) as u8, 99, (x * y) as u8]));
    let dynamic = image::DynamicImage::ImageRgba8(img);
    for (name, fmt, im) in [
        ("enc.gif", image::ImageFormat::Gif, dynamic.clone()),
        ("enc.bmp", image::ImageFormat::Bmp, dynamic.clone()),
        ("enc.webp", image::ImageFormat::WebP, dynamic.clone()),
        ("enc.tiff", image::ImageFormat::Tiff, dynamic.to_rgb8().into()),
        ("enc_1x13.png", image::ImageFormat::Png, dynamic.resize_exact(1, 13, image::imageops::FilterType::Nearest)),
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        im.write_to(&mut out, fmt).unwrap();
        seeds.push((name.to_string(), out.into_inner()));
    }
    seeds
}

/// Where an image format stores its size: (offset, bytes, big endian), found in the seed.
pub(crate) fn dim_fields(b: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let find = |pat: &[u8]| b.windows(pat.len()).position(|w| w == pat);
    if b.starts_with(b"\x89PNG") {
        out.extend([(16, 4, true), (20, 4, true)]);
    } else if b.starts_with(b"BM") {
        out.extend([(18, 4, false), (22, 4, false)]);
    } else if b.starts_with(b"GIF") {
        out.extend([(6, 2, false), (8, 2, false)]);
        if let Some(i) = b.iter().skip(13).position(|&x| x == 0x2c).map(|i| i + 13) {
            out.extend([(i + 5, 2, false), (i + 7, 2, false)]);
        }
    } else if b.starts_with(&[0xff, 0xd8]) {
        for sof in [[0xffu8, 0xc0], [0xff, 0xc2], [0xff, 0xc1]] {
            if let Some(i) = find(&sof) {
                out.extend([(i + 5, 2, true), (i + 7, 2, true)]);
            }
        }
    } else if b.starts_with(b"RIFF") {
        if let Some(i) = find(b"VP8L") {
            out.push((i + 9, 4, false));
        }
        if let Some(i) = find(b"VP8X") {
            out.extend([(i + 12, 3, false), (i + 15, 3, false)]);
        }
        if let Some(i) = find(b"VP8 ") {
            out.extend([(i + 14, 2, false), (i + 16, 2, false)]);
        }
    } else if b.starts_with(b"II*\0") {
        // IFD entries ImageWidth (256) / ImageLength (257), SHORT or LONG, count 1: value at +8.
        for i in 0..b.len().saturating_sub(12) {
            if (b[i] == 0 || b[i] == 1)
                && b[i + 1] == 1
                && (b[i + 2] == 3 || b[i + 2] == 4)
                && b[i + 3] == 0
                && b[i + 4..i + 8] == [1, 0, 0, 0]
            {
                out.push((i + 8, if b[i + 2] == 3 { 2 } else { 4 }, false));
            }
        }
    }
    out.retain(|&(o, n, _)| o + n <= b.len());
    out
}

pub(crate) const DIMS: [u64; 12] =
    [0, 1, 2, 3, 13000, 50000, 0x7fff, 0xffff, 0x1_0000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

/// Encoded images corrupted (headers claiming huge or zero sizes, truncation, flipped bits) decode
/// to an image or a typed error, under the default pixel limit and a small one.
#[test]
pub(crate) fn fuzz_image_decode() {
    let seeds = image_seeds();
    for (name, b) in &seeds {
        assert!(!dim_fields(b).is_empty(), "{name}: size fields not found in {:?}", &b[..b.len().min(48)]);
    }
    let max_pixels = prop_oneof![6 => Just(None), 3 => Just(Some(1u64 << 20)), 1 => prop::sample::select(vec![Some(0u64), Some(1), Some(300)])];
    let ops = prop_oneof![3 => byte_ops(1), 1 => byte_ops(4)];
    let dims = prop::collection::vec((any::<Index>(), 0..DIMS.len()), 0..=2);
    let ops = prop_oneof![2 => Just(Vec::new()), 1 => ops];
    let strategy = (0..seeds.len(), dims, ops, prop::bool::weighted(0.8), max_pixels);
    fuzz("image_decode", 9, strategy, |(s, dims, ops, fix_crc, max_pixels)| {
        let (name, seed) = &seeds[s];
        let mut bytes = seed.clone();
        let fields = dim_fields(&bytes);
        if !fields.is_empty() {
            for (at, d) in &dims {
                let (o, n, be) = fields[at.index(fields.len())];
                let v = if be { DIMS[*d].to_be_bytes() } else { DIMS[*d].to_le_bytes() };
                bytes[o..o + n].copy_from_slice(if be { &v[8 - n..] } else { &v[..n] });
            }
        }
        let mut bytes = mutate_bytes(bytes, &ops, 40);
        if fix_crc && name.ends_with(".png") {
            fix_png_crcs(&mut bytes);
        }
        if let Some(img) = check("decode_image", decode_image(&bytes, max_pixels))? {
            prop_assert!(img.width > 0 && img.height > 0);
            prop_assert!(max_pixels.is_none_or(|m| (img.width * img.height) as u64 <= m));
            check("validate", img.validate())?;
            // What a decoded file goes through next.
            check("to_rgb", img.to_rgb())?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Image processor
// ---------------------------------------------------------------------------------------------

pub(crate) const MODES: [PilMode; 11] = [
    PilMode::One,
    PilMode::L,
    PilMode::La,
    PilMode::P,
    PilMode::Pa,
    PilMode::Rgb,
    PilMode::Rgba,
    PilMode::Rgbx,
    PilMode::Cmyk,
    PilMode::I16,
    PilMode::I16B,
];

/// Sizes: small, 1xN / Nx1 strips, 1x1, and zero.
pub(crate) fn image_size() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        4 => (1usize..=40, 1usize..=40),
        2 => (Just(1usize), 1usize..=300),
        2 => (1usize..=300, Just(1usize)),
        1 => Just((1usize, 1usize)),
        1 => (0usize..=2, 0usize..=2),
    ]
}

pub(crate) fn lcg_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// An image as a caller builds it: mostly consistent (a palette for "P"/"PA", a transparency that
/// fits the mode), sometimes with a wrong buffer length, palette or transparency.
pub(crate) fn raw_image() -> impl Strategy<Value = RawImage> {
    let transparency = prop_oneof![Just(0i64), Just(-1), Just(255), Just(65535), Just(1 << 40), any::<i64>()];
    (0..MODES.len(), image_size(), any::<u64>(), 0u8..14, transparency, -2i64..=2, 0usize..1100).prop_map(
        |(m, (w, h), seed, corrupt, tv, delta, bad_len)| {
            let mode = MODES[m];
            let n = (w * h * mode.bytes_per_pixel()) as i64 + if corrupt == 0 { delta } else { 0 };
            let mut data = lcg_bytes(seed, n.max(0) as usize);
            if mode == PilMode::One {
                data.iter_mut().for_each(|v| *v = if *v & 1 == 1 { 255 } else { 0 });
            }
            let palette_len = match corrupt {
                1 => Some(bad_len),
                2 => None,
                _ if matches!(mode, PilMode::P | PilMode::Pa) => Some((seed as usize % 257) * 4),
                _ => None,
            };
            let palette = palette_len.map(|len| lcg_bytes(seed ^ 0x55, len));
            let transparency = match (corrupt, mode) {
                (3, _) => Some(Transparency::Rgb(tv, 0, 255)),
                (4..=6, PilMode::One | PilMode::L | PilMode::I16 | PilMode::I16B) => Some(Transparency::Value(tv)),
                (4 | 5, PilMode::P) => Some(Transparency::Value(tv)),
                (6, PilMode::P) => Some(Transparency::PaletteAlpha(lcg_bytes(seed, bad_len % 300))),
                (4..=6, PilMode::Rgb) => Some(Transparency::Rgb(tv, (seed & 0xff) as i64, 7)),
                (4..=6, _) => Some(Transparency::Value(tv)),
                _ => None,
            };
            // A size that claims far more pixels than the buffer holds.
            let (w, h) = match corrupt {
                7 => (usize::MAX / 2 + (seed as usize & 7), h),
                8 => (w, 1 << 40),
                _ => (w, h),
            };
            RawImage { mode, width: w, height: h, data, palette, transparency }
        },
    )
}

/// Processor configs with every field drawn, sizes kept small enough to run quickly in debug (the
/// huge ones are in the JSON target).
pub(crate) fn processor_config() -> impl Strategy<Value = ImageProcessorConfig> {
    let size = prop_oneof![
        (0usize..=120).prop_map(ResizeTarget::LongestEdge),
        (0usize..=64, 0usize..=64).prop_map(|(height, width)| ResizeTarget::Exact { height, width }),
    ];
    let float = prop_oneof![Just(0.0f64), Just(0.5), Just(-1.0), Just(f64::NAN), Just(1e300), -2.0f64..2.0];
    let floats = prop_oneof![
        4 => prop::collection::vec(float.clone(), 3),
        2 => prop::collection::vec(float.clone(), 1),
        1 => prop::collection::vec(float, 0..=4),
    ];
    let flags = prop::collection::vec(any::<bool>(), 7);
    (
        flags,
        size,
        0i64..6,
        0usize..=48,
        prop_oneof![Just(1.0 / 255.0), Just(0.0), Just(f64::INFINITY), any::<f64>()],
        floats.clone(),
        floats,
    )
        .prop_map(|(f, size, resample, max_image_size, rescale_factor, image_mean, image_std)| {
            ImageProcessorConfig {
                do_convert_rgb: f[0],
                do_resize: f[1],
                size,
                resample: Filter::from_pil(resample).unwrap(),
                do_image_splitting: f[2],
                max_image_size,
                do_rescale: f[3],
                rescale_factor,
                do_normalize: f[4],
                image_mean,
                image_std,
                do_pad: f[5] || f[6],
            }
        })
}

pub(crate) fn check_batch(images: &[Vec<RawImage>], cfg: &ImageProcessorConfig) -> Result<(), TestCaseError> {
    if let Some(out) = check("process", process(images, cfg))? {
        let plane = out.height * out.width;
        prop_assert_eq!(out.pixel_values.len(), out.batch * out.max_frames * 3 * plane);
        if let Some(mask) = &out.pixel_attention_mask {
            prop_assert_eq!(mask.len(), out.batch * out.max_frames * plane);
        }
        prop_assert_eq!(out.rows.len(), images.len());
    }
    Ok(())
}

/// Arbitrary images (every PIL mode, 1xN strips, zero sizes, wrong buffers) through processor
/// configs with every option drawn; plus `RawImage::from_pil` and `resize` on the same sizes.
#[test]
pub(crate) fn fuzz_image_processor() {
    let batch = prop_oneof![
        6 => prop::collection::vec(prop::collection::vec(raw_image(), 1..3), 1..3),
        1 => prop::collection::vec(prop::collection::vec(raw_image(), 0..3), 0..3),
    ];
    let pil = (
        prop_oneof![
            8 => prop::sample::select(vec!["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "I;16", "I;16B", "I;16L"]),
            1 => prop::sample::select(vec!["YCbCr", "F", "", "rgb"]),
        ],
        image_size(),
        any::<u64>(),
        prop_oneof![6 => Just(0i64), 1 => -2i64..=2],
        prop::option::of(prop_oneof![3 => (0usize..=256).prop_map(|n| n * 3), 1 => 0usize..1100]),
        prop::option::of(prop::sample::select(vec!["RGB", "RGBA", "L", "x"])),
    );
    let rs = (image_size(), prop_oneof![8 => 1usize..=4, 1 => 0usize..=6], 0usize..=80, 0usize..=80, 0i64..6);
    fuzz("image_processor", 10, (batch, processor_config(), pil, rs), |(images, cfg, pil, rs)| {
        check_batch(&images, &cfg)?;
        let (mode, (w, h), seed, delta, palette, palette_mode) = pil;
        let bpp = match mode {
            "1" => 0,
            "L" | "P" | "" | "YCbCr" | "F" => 1,
            "LA" | "PA" | "I;16" | "I;16B" | "I;16L" => 2,
            "RGB" => 3,
            _ => 4,
        };
        let n = if bpp == 0 { w.div_ceil(8) * h } else { w * h * bpp } as i64 + delta;
        let palette = palette.map(|len| lcg_bytes(seed, len));
        if let Some(img) = check(
            "from_pil",
            RawImage::from_pil(mode, w, h, lcg_bytes(seed, n.max(0) as usize), palette, palette_mode),
        )? {
            check("to_rgb", img.to_rgb())?;
            check("to_rgb_plain", img.to_rgb_plain())?;
            check("convert_rgb", img.convert_rgb())?;
        }
        let ((w, h), c, nw, nh, f) = rs;
        let data = lcg_bytes(seed, w * h * c);
        if let Some(view) = check("ImageView::new", ImageView::new(w, h, c, &data))? {
            if let Some(out) = check("resize", resize(view, nw, nh, Filter::from_pil(f).unwrap()))? {
                prop_assert_eq!(out.data.len(), nw * nh * c);
            }
        }
        Ok(())
    });
}

pub(crate) const PREPROCESSOR_KEYS: [&str; 17] = [
    "image_processor",
    "do_convert_rgb",
    "do_resize",
    "size",
    "longest_edge",
    "shortest_edge",
    "height",
    "width",
    "resample",
    "do_image_splitting",
    "max_image_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_pad",
];

/// preprocessor_config.json corrupted, then (when the sizes it asks for are cheap to produce in a
/// debug build, or so huge they must be refused at once) used on a small batch.
#[test]
pub(crate) fn fuzz_preprocessor_config() {
    let seeds: Vec<Value> = vec![
        serde_json::from_slice(&read(fixtures().join("processor/config/preprocessor_config.json"))).unwrap(),
        json!({"image_processor": {"size": [48, 32], "max_image_size": {"longest_edge": 16}, "do_image_splitting": false, "resample": 3}}),
        ImageProcessorConfig::default().to_json(),
    ];
    let extra = vec![
        json!({"longest_edge": 64}),
        json!({"height": 20, "width": 30}),
        json!({"shortest_edge": 10, "longest_edge": 0}),
        json!({"max_height": 5, "max_width": 5}),
        json!({"longest_edge": 4294967295u64}),
        json!({"longest_edge": 4294967296u64}),
        json!({"height": 1, "width": 268435456}),
        json!([1, 268435456]),
        json!([3, 2, 1]),
        json!(5),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(4),
        json!(5),
    ];
    let images = prop::collection::vec(prop::collection::vec(raw_image(), 1..3), 1..3);
    fuzz("preprocessor_config", 11, (0..seeds.len(), json_mut(), images), |(s, m, images)| {
        let text = apply_json(&seeds[s], &m, &PREPROCESSOR_KEYS, &extra);
        let Ok(v) = serde_json::from_slice::<Value>(&text) else { return Ok(()) };
        if let Some(cfg) = check("ImageProcessorConfig::from_json", ImageProcessorConfig::from_json(&v))? {
            // Sizes in between (a 4096 px edge, 20000 px tiles) are legal and merely slow.
            let ok = |n: usize| n <= 128 || n >= 1 << 28;
            let target = match cfg.size {
                _ if !cfg.do_resize => true,
                ResizeTarget::LongestEdge(l) => l <= 128,
                ResizeTarget::Exact { height, width } => {
                    ok(height) && ok(width) && (height >= 1 << 28 || width >= 1 << 28 || height * width <= 128 * 128)
                }
            };
            if target && ok(cfg.max_image_size) {
                check_batch(&images, &cfg)?;
            }
            prop_assert_eq!(ImageProcessorConfig::from_json(&cfg.to_json()).ok(), Some(cfg));
        }
        Ok(())
    });
}
