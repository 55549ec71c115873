//! The bf16 compute mode (dtype bfloat16 on the CPU): f32 activations, bf16 Linear weights multiplied
//! with the AVX512-BF16 kernel for more than 16 rows, the skinny kernel below.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use ferrovlm::model::{no_interrupt, ForwardInput, VlmModel};
use ferrovlm::ops::linear::Weight;
use ferrovlm::ops::matmul_bf16_packed;
use ferrovlm::ops::Linear;
use half::bf16;

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn bf16_linear_matches_f32_and_the_packed_kernel() {
    let dev = Device::Cpu;
    // Odd sizes: a partial NR panel of output columns and an odd k tail.
    let (out, k) = (203, 131);
    let w = Tensor::randn(0f32, 0.1, (out, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, out, &dev).unwrap();
    let f32_lin = Linear::new(w.clone(), Some(b.clone())).unwrap();
    let lin = Linear::bf16_compute(w.clone(), Some(b.clone())).unwrap();
    let lin_nob = Linear::bf16_compute(w.clone(), None).unwrap();
    assert_eq!(lin.weight_tensor().expect("dense").dtype(), DType::BF16);
    assert_eq!(lin.weight_tensor().expect("dense").dims(), &[out, k]);
    assert_eq!(matches!(lin.weight, Weight::PackedBf16 { .. }), matmul_bf16_packed::available());
    let wb: Vec<bf16> = w.to_dtype(DType::BF16).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // The skinny reference for few rows: the existing bf16-storage path.
    let skinny = Linear::with_compute_dtype(w.to_dtype(DType::BF16).unwrap(), None, DType::F32).unwrap();
    for n in [1usize, 7, 16, 17, 50, 200] {
        let x = Tensor::randn(0f32, 1.0, (2, n, k), &dev).unwrap(); // rows = 2n
        let rows = 2 * n;
        let y32 = vals(&f32_lin.forward(&x).unwrap());
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, n, out]);
        let y = vals(&y);
        let d = max_diff(&y, &y32);
        assert!(d <= 1e-2 * max_abs(&y32), "rows {rows}: bf16 vs f32 diff {d}, scale {}", max_abs(&y32));
        let ynb = vals(&lin_nob.forward(&x).unwrap());
        let xs = vals(&x);
        if rows > 16 && matmul_bf16_packed::available() {
            let want = matmul_bf16_packed::matmul_f32_bf16(&xs, rows, k, &wb, out);
            assert!(
                ynb == want,
                "rows {rows}: packed path differs from matmul_f32_bf16 (max diff {})",
                max_diff(&ynb, &want)
            );
        } else {
            let want = vals(&skinny.forward(&x).unwrap());
            assert!(
                ynb == want,
                "rows {rows}: skinny path differs from the bf16-storage path (max diff {})",
                max_diff(&ynb, &want)
            );
        }
    }
}

#[test]
fn bf16_linear_tracked_input_has_a_gradient() {
    // Training calls forward with tracked inputs: the new weight variant goes through the fused op.
    let dev = Device::Cpu;
    let (out, k, n) = (70, 48, 40);
    let w = Tensor::randn(0f32, 0.1, (out, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, out, &dev).unwrap();
    let lin = Linear::bf16_compute(w.clone(), Some(b.clone())).unwrap();
    let f32_lin = Linear::new(w.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap(), Some(b)).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap()).unwrap();
    let y = lin.forward(x.as_tensor()).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let dx = vals(g.get(x.as_tensor()).unwrap());
    let y2 = f32_lin.forward(x.as_tensor()).unwrap();
    let g2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let dx2 = vals(g2.get(x.as_tensor()).unwrap());
    assert!(max_diff(&vals(&y), &vals(&y2)) <= 1e-4 * max_abs(&vals(&y2)));
    assert!(max_diff(&dx, &dx2) <= 1e-4 * max_abs(&dx2), "dx diff {}", max_diff(&dx, &dx2));
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

#[test]
fn bf16_mode_model_is_close_to_f32() {
    let dir = fixtures().join("idefics3_gqa");
    let ck = dir.join("checkpoint");
    let m32 = VlmModel::from_dir(&ck, DType::F32, &Device::Cpu).unwrap();
    let m16 = VlmModel::from_dir(&ck, DType::BF16, &Device::Cpu).unwrap();
    assert!(!m32.bf16_compute && m32.reported_dtype() == DType::F32);
    assert!(m16.bf16_compute && m16.reported_dtype() == DType::BF16 && m16.dtype == DType::F32);
    for (name, lin) in m16.linears() {
        assert_eq!(lin.weight_tensor().expect("dense").dtype(), DType::BF16, "{name}");
        assert_eq!(matches!(lin.weight, Weight::PackedBf16 { .. }), matmul_bf16_packed::available(), "{name}");
    }
    for (name, lin) in m32.linears() {
        assert!(
            matches!(lin.weight, Weight::Dense(_)) && lin.weight_tensor().expect("dense").dtype() == DType::F32,
            "{name}"
        );
    }
    assert_eq!(m16.num_parameters(), m32.num_parameters());

    let inp: std::collections::HashMap<String, Tensor> =
        Tensor::read_npz(dir.join("inputs.npz")).unwrap().into_iter().collect();
    let (b, l) = inp["input_ids"].dims2().unwrap();
    let ids = i64s(&inp["input_ids"]);
    let am = i64s(&inp["attention_mask"]);
    let labels = i64s(&inp["labels"]);
    let pam: Vec<bool> =
        inp["pixel_attention_mask"].flatten_all().unwrap().to_vec1::<u8>().unwrap().iter().map(|&v| v != 0).collect();
    let input = ForwardInput {
        input_ids: &ids,
        batch: b,
        seq_len: l,
        attention_mask: Some(&am),
        pixel_values: Some(&inp["pixel_values"]),
        pixel_attention_mask: Some(&pam),
        labels: Some(&labels),
        logits_to_keep: 0,
    };
    let o32 = m32.forward(&input, &no_interrupt).unwrap();
    let o16 = m16.forward(&input, &no_interrupt).unwrap();
    assert_eq!(o16.logits.dtype(), DType::F32);
    let (g32, g16) = (o32.logits.to_vec3::<f32>().unwrap(), o16.logits.to_vec3::<f32>().unwrap());
    let (mut diff, mut scale, mut agree, mut total) = (0f32, 0f32, 0usize, 0usize);
    let argmax = |v: &[f32]| {
        v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
    };
    for bi in 0..b {
        for t in 0..l {
            if am[bi * l + t] == 0 {
                continue;
            }
            let (a, c) = (&g32[bi][t], &g16[bi][t]);
            assert!(c.iter().all(|x| x.is_finite()));
            diff = diff.max(max_diff(a, c));
            scale = scale.max(max_abs(a));
            total += 1;
            agree += (argmax(a) == argmax(c)) as usize;
        }
    }
    assert!(diff > 0.0, "bf16 mode gave exactly the f32 logits: the bf16 weights are not used");
    assert!(diff <= 2e-2 * scale, "bf16 mode logits diff {diff} vs scale {scale}");
    assert!(agree * 10 >= total * 9, "argmax agrees at {agree} of {total} positions");
    let (l32, l16) = (o32.loss.unwrap(), o16.loss.unwrap());
    assert!((l32 - l16).abs() <= 1e-2 * l32.abs(), "loss {l16} vs f32 {l32}");
    println!("bf16 mode: logits diff {diff} (scale {scale}), argmax {agree}/{total}, loss {l16} vs {l32}");
}

#[test]
fn unpacked_bf16_linear_gives_the_same_numbers_tracked_or_not() {
    // While adapters are attached the bf16 compute mode keeps weights unpacked (`Weight::Bf16`): the
    // untracked product and the tracked op must then round alike, bias included, also when gemm splits
    // the depth into several blocks (large k).
    let dev = Device::Cpu;
    for (out, k) in [(70, 48), (150, 1500)] {
        let w = Tensor::randn(0f32, 0.05, (out, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, out, &dev).unwrap();
        let mut lin = Linear::bf16_compute(w, Some(b)).unwrap();
        if let Weight::PackedBf16 { w, .. } = &lin.weight {
            lin.weight = Weight::Bf16(w.clone());
        }
        assert!(matches!(lin.weight, Weight::Bf16(_)));
        for n in [5usize, 16, 17, 300] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let plain = vals(&lin.forward(&x).unwrap());
            let tracked = vals(&lin.forward(Var::from_tensor(&x).unwrap().as_tensor()).unwrap());
            assert!(plain == tracked, "[{out}x{k}] rows {n}: tracked differs by {}", max_diff(&plain, &tracked));
        }
    }
}

#[test]
fn bf16_mode_with_adapters_runs_one_arithmetic() {
    use ferrovlm::lora::{self, AdapterPlan, LoraInit, LoraSpec};

    let dir = fixtures().join("idefics3_gqa");
    let mut m = VlmModel::from_dir(&dir.join("checkpoint"), DType::BF16, &Device::Cpu).unwrap();
    let inp: std::collections::HashMap<String, Tensor> =
        Tensor::read_npz(dir.join("inputs.npz")).unwrap().into_iter().collect();
    let (b, l) = inp["input_ids"].dims2().unwrap();
    let (ids, am) = (i64s(&inp["input_ids"]), i64s(&inp["attention_mask"]));
    let pam: Vec<bool> =
        inp["pixel_attention_mask"].flatten_all().unwrap().to_vec1::<u8>().unwrap().iter().map(|&v| v != 0).collect();
    let input = ForwardInput {
        input_ids: &ids,
        batch: b,
        seq_len: l,
        attention_mask: Some(&am),
        pixel_values: Some(&inp["pixel_values"]),
        pixel_attention_mask: Some(&pam),
        labels: None,
        logits_to_keep: 0,
    };
    let logits = |m: &VlmModel| vals(&m.forward(&input, &no_interrupt).unwrap().logits);
    let packed = logits(&m);
    let targets: Vec<String> = m.linears().into_iter().map(|(n, _)| n).filter(|n| n != "lm_head").collect();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_dora: false,
        use_rslora: false,
        init: LoraInit::Default,
        seed: 1,
    };
    lora::attach(&mut m, &AdapterPlan { lora_targets: targets, spec, modules_to_save: vec![], saved_params: vec![] })
        .unwrap();
    for (name, lin) in m.linears() {
        assert!(matches!(lin.weight, Weight::Bf16(_)), "{name}: packed while adapters are attached");
    }
    // A fresh adapter (lora_B = 0) on or off: the same function, the same numbers (its outputs are
    // tracked, the adapter-off pass is not).
    let on = logits(&m);
    m.switch.set_enabled(false);
    let off = logits(&m);
    m.switch.set_enabled(true);
    assert!(on == off, "fresh adapter on vs off: max diff {}", max_diff(&on, &off));
    lora::detach(&mut m, false).unwrap();
    for (name, lin) in m.linears() {
        assert_eq!(
            matches!(lin.weight, Weight::PackedBf16 { .. }),
            matmul_bf16_packed::available(),
            "{name}: not packed again"
        );
    }
    assert!(logits(&m) == packed, "after detach the model is the adapter-free one again");
}

/// `bf16=True` training (autocast): an f32 weight and a bf16-stored one both get the packed bf16 copy;
/// the untracked and the tracked product are the packed kernel's, bit for bit (x rounded to bf16, f32
/// accumulation, then the bias), and the backward to x is autocast's bf16 one: dx = bf16(g) bf16(W) with
/// f32 sums (not the f32 product g W, which it differs from by bf16 rounding).
#[test]
fn autocast_linear_runs_the_packed_kernel_tracked_or_not() {
    let dev = Device::Cpu;
    let (out, k, n) = (203, 131, 37);
    let w32 = Tensor::randn(0f32, 0.1, (out, k), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, out, &dev).unwrap();
    let w16 = w32.to_dtype(DType::BF16).unwrap();
    let wb: Vec<bf16> = w16.flatten_all().unwrap().to_vec1().unwrap();
    let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let xs = vals(&x);
    for stored in [Linear::new(w32.clone(), Some(b.clone())).unwrap(), {
        Linear::with_compute_dtype(w16.clone(), Some(b.clone()), DType::F32).unwrap()
    }] {
        let lin = stored.with_bf16_autocast().unwrap();
        if !matmul_bf16_packed::available() {
            assert!(!matches!(lin.weight, Weight::Autocast { .. }), "no AVX512-BF16: products stay f32");
            continue;
        }
        assert!(matches!(lin.weight, Weight::Autocast { .. }));
        let mut want = matmul_bf16_packed::matmul_f32_bf16(&xs, n, k, &wb, out);
        let bv = vals(&b);
        want.chunks_mut(out).for_each(|r| r.iter_mut().zip(&bv).for_each(|(y, b)| *y += b));
        assert!(vals(&lin.forward(&x).unwrap()) == want, "untracked product is not the packed kernel's");
        let xv = Var::from_tensor(&x).unwrap();
        let y = lin.forward(xv.as_tensor()).unwrap();
        assert!(vals(&y) == want, "tracked product is not the packed kernel's");
        let g = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = vals(grads.get(xv.as_tensor()).unwrap());
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let dx_want = vals(&round(&g).matmul(&round(&w32)).unwrap()); // bf16(g) [n, out] bf16(W) [out, k]
        assert!(max_diff(&dx, &dx_want) <= 1e-5 * max_abs(&dx_want), "dx diff {}", max_diff(&dx, &dx_want));
        let dx_f32 = vals(&g.matmul(&w32).unwrap());
        let d = max_diff(&dx, &dx_f32);
        assert!(d > 0.0 && d <= 2e-2 * max_abs(&dx_f32), "dx vs the f32 product: {d} (bf16 rounding expected)");
    }
}
