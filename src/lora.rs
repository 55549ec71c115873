//! Adapters on Linear layers with PEFT's semantics: LoRA (optionally DoRA) and `modules_to_save`
//! (a trainable full copy of a layer).
//!
//! An adapter hangs off a [`Linear`] (`Linear::adapter`); `Linear::forward` calls [`Adapter::forward`].
//! All adapters of a model share one [`AdapterSwitch`]: adapters on/off (PEFT's `disable_adapter()`),
//! training mode (dropout) and the dropout seed of the current forward. Trainable tensors are candle
//! `Var`s; candle's autograd gives their gradients, while the frozen base weight goes through the
//! Linear op, which never makes a gradient for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result as CResult, Tensor, Var, D};

use crate::error::{input_err, Result};
use crate::generate::Rng;
use crate::ops::linear::Weight;
use crate::ops::Linear;

/// Model-wide adapter state.
#[derive(Debug, Default)]
pub struct AdapterSwitch {
    disabled: AtomicBool,
    training: AtomicBool,
    /// Seed of the dropout masks of the current forward (set per layer by the training step, so that a
    /// recomputed layer draws the same masks).
    seed: AtomicU64,
    /// Non-zero while a [`FrozenScope`] promises that no weight changes (a `generate` call): DoRA's weight
    /// norms, a function of the weights alone, are then computed once per scope instead of once per forward.
    frozen_epoch: AtomicU64,
}

/// Epochs of frozen scopes, unique in the process (0 means "not frozen").
static FROZEN_EPOCHS: AtomicU64 = AtomicU64::new(1);

/// While alive, the adapters' weights are promised not to change (see `AdapterSwitch::frozen_epoch`).
pub struct FrozenScope<'s> {
    switch: &'s AdapterSwitch,
    previous: u64,
}

impl Drop for FrozenScope<'_> {
    fn drop(&mut self) {
        self.switch.frozen_epoch.store(self.previous, Ordering::SeqCst)
    }
}

impl AdapterSwitch {
    pub fn set_enabled(&self, on: bool) {
        self.disabled.store(!on, Ordering::SeqCst)
    }
    pub fn enabled(&self) -> bool {
        !self.disabled.load(Ordering::SeqCst)
    }
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::SeqCst)
    }
    pub fn training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }
    pub fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::SeqCst)
    }
    /// Promises that no adapter or base weight changes until the scope is dropped (nested scopes keep the
    /// outer one's epoch). Training mode is never frozen.
    pub fn frozen_scope(&self) -> FrozenScope<'_> {
        let previous = self.frozen_epoch.load(Ordering::SeqCst);
        if previous == 0 {
            self.frozen_epoch.store(FROZEN_EPOCHS.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
        }
        FrozenScope { switch: self, previous }
    }
    /// The current frozen scope's epoch, or None outside one (or in training mode).
    fn frozen(&self) -> Option<u64> {
        match self.frozen_epoch.load(Ordering::SeqCst) {
            0 => None,
            _ if self.training() => None,
            e => Some(e),
        }
    }
}

/// How LoRA weights start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// A: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B: zeros.
    Default,
    /// A: N(0, 1/r); B: zeros.
    Gaussian,
    /// No reset: both keep nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Random,
}

impl LoraInit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "true" | "True" | "default" => Ok(LoraInit::Default),
            "gaussian" => Ok(LoraInit::Gaussian),
            "false" | "False" => Ok(LoraInit::Random),
            other => input_err(format!("init_lora_weights={other:?} is not supported (True, False, \"gaussian\")")),
        }
    }
}

/// Settings of one LoRA layer.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_dora: bool,
    pub use_rslora: bool,
    pub init: LoraInit,
    pub seed: u64,
}

impl LoraSpec {
    /// PEFT: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

#[derive(Debug)]
pub struct LoraAdapter {
    /// [r, in]
    pub a: Var,
    /// [out, r]
    pub b: Var,
    /// DoRA magnitude [out].
    pub magnitude: Option<Var>,
    pub scaling: f64,
    pub dropout: f32,
    /// Distinguishes this layer's dropout stream from the others'.
    pub index: u64,
    /// DoRA's weight norm [out] computed in the frozen scope of the given epoch.
    pub norm_cache: Mutex<Option<(u64, Tensor)>>,
}

#[derive(Debug)]
pub enum AdapterKind {
    Lora(LoraAdapter),
    /// `modules_to_save`: a trainable copy of the layer's weight [out, in] and bias [out].
    Full {
        weight: Var,
        bias: Option<Var>,
    },
}

#[derive(Debug)]
pub struct Adapter {
    pub kind: AdapterKind,
    pub switch: Arc<AdapterSwitch>,
}

fn uniform(rng: &mut Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
}

fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// Row-wise L2 norm of W + scaling * B A, detached. w: [out, in] -> [out]
fn weight_norm(lin: &Linear, a: &Tensor, b: &Tensor, scaling: f64) -> CResult<Tensor> {
    // A quantized weight dequantizes on the host: brought to the adapter's device.
    let w = lin.dense_weight()?.to_dtype(DType::F32)?.to_device(a.device())?.detach(); // [out, in]
    let ba = b.detach().matmul(&a.detach())?; // [out, in]
    let full = (w + (ba * scaling)?)?;
    full.sqr()?.sum(D::Minus1)?.sqrt()
}

impl Adapter {
    /// A new LoRA adapter for `lin` (f32 on the model's device `dev`; the values are drawn on the host,
    /// so every device starts from the same ones).
    pub fn lora(lin: &Linear, spec: &LoraSpec, index: u64, switch: Arc<AdapterSwitch>, dev: &Device) -> CResult<Self> {
        let (r, i_f, o_f) = (spec.r, lin.in_features, lin.out_features);
        let mut rng = Rng::new(spec.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (a, b) = match spec.init {
            LoraInit::Default => (uniform(&mut rng, r * i_f, 1.0 / (i_f as f64).sqrt()), vec![0f32; o_f * r]),
            LoraInit::Gaussian => (normal(&mut rng, r * i_f, 1.0 / r as f64), vec![0f32; o_f * r]),
            LoraInit::Random => (
                uniform(&mut rng, r * i_f, 1.0 / (i_f as f64).sqrt()),
                uniform(&mut rng, o_f * r, 1.0 / (r as f64).sqrt()),
            ),
        };
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, i_f), dev)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(b, (o_f, r), dev)?)?;
        let scaling = spec.scaling();
        let magnitude = if spec.use_dora { Some(Var::from_tensor(&weight_norm(lin, &a, &b, scaling)?)?) } else { None };
        Ok(Adapter {
            kind: AdapterKind::Lora(LoraAdapter {
                a,
                b,
                magnitude,
                scaling,
                dropout: spec.dropout,
                index,
                norm_cache: Mutex::new(None),
            }),
            switch,
        })
    }

    /// A trainable full copy of `lin` (`modules_to_save`).
    pub fn full_copy(lin: &Linear, switch: Arc<AdapterSwitch>) -> CResult<Self> {
        let weight = Var::from_tensor(&lin.dense_weight()?.to_dtype(DType::F32)?)?;
        let bias = lin.bias.as_ref().map(|b| Var::from_tensor(&b.to_dtype(DType::F32)?)).transpose()?;
        Ok(Adapter { kind: AdapterKind::Full { weight, bias }, switch })
    }

    /// The trainable tensors with their PEFT key suffixes (after `base_model.model.<module>.`).
    pub fn params(&self) -> Vec<(&'static str, &Var)> {
        match &self.kind {
            AdapterKind::Lora(l) => {
                let mut v = vec![("lora_A.weight", &l.a), ("lora_B.weight", &l.b)];
                if let Some(m) = &l.magnitude {
                    v.push(("lora_magnitude_vector", m));
                }
                v
            }
            AdapterKind::Full { weight, bias } => {
                let mut v = vec![("weight", weight)];
                if let Some(b) = bias {
                    v.push(("bias", b));
                }
                v
            }
        }
    }

    /// y = lin(x) with this adapter applied. `base` computes the frozen layer on a given input.
    /// x: [.., in] -> [.., out]
    pub fn forward(&self, lin: &Linear, x: &Tensor, base: &dyn Fn(&Tensor) -> CResult<Tensor>) -> CResult<Tensor> {
        if !self.switch.enabled() {
            return base(x);
        }
        match &self.kind {
            AdapterKind::Full { weight, bias } => {
                let tmp = Linear::new(weight.as_tensor().clone(), bias.as_ref().map(|b| b.as_tensor().clone()))?;
                tmp.forward_base(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
            }
            AdapterKind::Lora(l) if l.magnitude.is_none() && self.switch.training() => {
                // A training pass: LoRA as one op with its own backward (ops/linear_lora.rs), where it
                // applies; the composition below is its reference.
                let mut mask = self.dropout_mask(x, l);
                let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
                match crate::ops::linear_lora::lora_linear(lin, x, a, b, l.scaling, &mut mask)? {
                    Some(y) => Ok(y),
                    None => self.compose(lin, x, l, mask, base),
                }
            }
            AdapterKind::Lora(l) => self.compose(lin, x, l, self.dropout_mask(x, l), base),
        }
    }

    /// The reference of [`Self::forward`] (tests): LoRA and DoRA as the composition of candle ops with
    /// the base layer through `Linear::forward_reference`, dropout drawing the same mask.
    pub fn forward_reference(&self, lin: &Linear, x: &Tensor) -> CResult<Tensor> {
        match &self.kind {
            AdapterKind::Lora(l) if self.switch.enabled() => {
                self.compose(lin, x, l, self.dropout_mask(x, l), &|x| lin.forward_reference(x))
            }
            _ => self.forward(lin, x, &|x| lin.forward_reference(x)),
        }
    }

    /// The LoRA / DoRA forward as a composition of ops (autograd differentiates each), given dropout's
    /// mask: the reference of `ops::linear_lora`, and the path for DoRA, GPUs and quantized layers.
    pub(crate) fn compose(
        &self,
        lin: &Linear,
        x: &Tensor,
        l: &LoraAdapter,
        mask: Option<Vec<f32>>,
        base: &dyn Fn(&Tensor) -> CResult<Tensor>,
    ) -> CResult<Tensor> {
        let y = base(x)?; // [.., out]
        let xd = match mask {
            Some(m) => (x * Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?)?,
            None => x.clone(),
        }; // [.., in]
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = xd.to_dtype(DType::F32)?.reshape((n, lin.in_features))?; // [N, in]
        let lora = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?; // [N, out]
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = lin.out_features;
        let lora = lora.reshape(out_dims)?;
        match &l.magnitude {
            None => {
                let dt = y.dtype();
                y + (lora * l.scaling)?.to_dtype(dt)?
            }
            Some(m) => {
                // PEFT DoRA: base + (m/||W + sBA|| - 1) * (W x) + m/||W + sBA|| * s * BAx, the norm detached;
                // with dropout active W x is recomputed on the dropped input.
                let wn = self.dora_norm(lin, l)?; // [out]
                let scale = m.as_tensor().broadcast_div(&wn)?; // [out]
                let mut wx = if l.dropout > 0.0 && self.switch.training() { base(&xd)? } else { y.clone() };
                if let Some(b) = &lin.bias {
                    wx = wx.broadcast_sub(&b.to_dtype(wx.dtype())?)?;
                }
                let wx = wx.to_dtype(DType::F32)?;
                let dora = (wx.broadcast_mul(&(&scale - 1.0)?)? + (lora * l.scaling)?.broadcast_mul(&scale)?)?;
                let dt = y.dtype();
                y + dora.to_dtype(dt)?
            }
        }
    }

    /// ||W + s B A|| per output row [out]: computed each forward, once per scope inside a frozen scope.
    fn dora_norm(&self, lin: &Linear, l: &LoraAdapter) -> CResult<Tensor> {
        let Some(epoch) = self.switch.frozen() else {
            return weight_norm(lin, &l.a, &l.b, l.scaling);
        };
        let mut cache = l.norm_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((e, t)) = cache.as_ref() {
            if *e == epoch {
                return Ok(t.clone());
            }
        }
        let wn = weight_norm(lin, &l.a, &l.b, l.scaling)?;
        *cache = Some((epoch, wn.clone()));
        Ok(wn)
    }

    /// Dropout's scaled keep mask for x (0 or 1 / (1 - p) per element), None when dropout is off.
    fn dropout_mask(&self, x: &Tensor, l: &LoraAdapter) -> Option<Vec<f32>> {
        if l.dropout <= 0.0 || !self.switch.training() {
            return None;
        }
        let seed = self.switch.seed.load(Ordering::SeqCst) ^ l.index.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut rng = Rng::new(seed);
        let keep = 1.0 - l.dropout as f64;
        Some((0..x.elem_count()).map(|_| if rng.next_f64() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect())
    }

    /// The merged weight [out, in] f32: W + s B A for LoRA, (m / ||W + s B A||) (W + s B A) for DoRA,
    /// the trained copy for `modules_to_save`.
    pub fn merged_weight(&self, lin: &Linear) -> CResult<(Tensor, Option<Tensor>)> {
        match &self.kind {
            AdapterKind::Full { weight, bias } => {
                Ok((weight.as_tensor().detach(), bias.as_ref().map(|b| b.as_tensor().detach())))
            }
            AdapterKind::Lora(l) => {
                let w = lin.dense_weight()?.to_dtype(DType::F32)?.to_device(l.a.device())?;
                let full = (w + (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scaling)?)?; // [out, in]
                let full = match &l.magnitude {
                    None => full,
                    Some(m) => {
                        let wn = full.sqr()?.sum(D::Minus1)?.sqrt()?; // [out]
                        full.broadcast_mul(&m.as_tensor().broadcast_div(&wn)?.unsqueeze(1)?)?
                    }
                };
                Ok((full.detach(), lin.bias.as_ref().map(|b| b.to_dtype(DType::F32)).transpose()?))
            }
        }
    }
}

/// Which layers get which adapter: module names as `VlmModel::linears` lists them.
#[derive(Debug, Clone)]
pub struct AdapterPlan {
    pub lora_targets: Vec<String>,
    pub spec: LoraSpec,
    /// Layers that get a trainable full copy.
    pub modules_to_save: Vec<String>,
    /// Other parameters (transformers' names) in `modules_to_save` modules: norms, embeddings, ...
    /// (`crate::model::saved`).
    pub saved_params: Vec<String>,
}

/// Attaches adapters to `model` (replacing any it had). Errors name a module that does not exist,
/// or one listed both as a LoRA target and in `modules_to_save`.
pub fn attach(model: &mut crate::model::VlmModel, plan: &AdapterPlan) -> Result<()> {
    let known: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
    for n in plan.lora_targets.iter().chain(&plan.modules_to_save) {
        if !known.contains(n) {
            return input_err(format!("no Linear module named '{n}' in this model"));
        }
    }
    if let Some(n) = plan.lora_targets.iter().find(|n| plan.modules_to_save.contains(n)) {
        return input_err(format!("module '{n}' is both a LoRA target and in modules_to_save"));
    }
    model.restore_originals()?;
    let switch = Arc::new(AdapterSwitch::default());
    model.switch = switch.clone();
    let bf16_compute = model.bf16_compute;
    let dev = model.device.clone();
    for (index, (name, lin)) in model.linears_mut().into_iter().enumerate() {
        lin.adapter = None;
        if plan.lora_targets.contains(&name) {
            lin.adapter = Some(Arc::new(Adapter::lora(lin, &plan.spec, index as u64, switch.clone(), &dev)?));
        } else if plan.modules_to_save.contains(&name) {
            lin.adapter = Some(Arc::new(Adapter::full_copy(lin, switch.clone())?));
        }
        if bf16_compute {
            unpack(lin);
        }
    }
    model.save_copies(&plan.saved_params)
}

/// The bf16 compute mode with adapters: every Linear of the model keeps its bf16 weight unpacked
/// (`Weight::Bf16`) while adapters are attached.
///
/// A packed weight (`Weight::PackedBf16`) is multiplied by the AVX512-BF16 kernel, which rounds the
/// activations to bf16, when autograd does not track the product, but by the f32-activation kernels
/// of the tracked op when it does. A model with adapters runs both kinds of pass (training, and the
/// DPO reference, evaluation, `disable_adapter()` inference, gradient-checkpointing recomputes...),
/// and which Linears see a tracked input depends on where the adapters sit: with packed weights, a
/// DPO reference pass with a fresh adapter switched off did not compute the policy's numbers (loss
/// 0.6931360 instead of ln 2), and a fresh adapter changed the logits. An unpacked bf16 weight is
/// multiplied by the same kernels tracked or not (f32 activations, bf16 weights widened exactly), so
/// every pass of the model runs one arithmetic. Without adapters (plain inference) the weights stay
/// packed, and [`detach`] packs them again.
fn unpack(lin: &mut Linear) {
    if let Weight::PackedBf16 { w, .. } = &lin.weight {
        lin.weight = Weight::Bf16(w.clone());
    }
}

/// Undoes [`unpack`].
fn repack(lin: &mut Linear) -> CResult<()> {
    if let Weight::Bf16(w) = &lin.weight {
        *lin = Linear::bf16_compute(w.clone(), lin.bias.clone())?;
    }
    Ok(())
}

/// Removes every adapter; with `merge`, folds each into its layer's weight first (`merge_and_unload`).
/// In the bf16 compute mode the weights are packed again (see [`unpack`]).
pub fn detach(model: &mut crate::model::VlmModel, merge: bool) -> Result<()> {
    let bf16_compute = model.bf16_compute;
    for (_, lin) in model.linears_mut() {
        if let Some(ad) = lin.adapter.take() {
            if merge {
                let (w, b) = ad.merged_weight(lin)?;
                if let Some(q) = lin.quant() {
                    // PEFT on a bitsandbytes layer: the merged weight is quantized again (rounding).
                    // A GGUF layer (dense f32 in transformers) becomes dense below.
                    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    if let Some(q) = q.requantize(&wv) {
                        let bf16 = matches!(lin.weight, crate::ops::linear::Weight::Quant { bf16: true, .. });
                        *lin = Linear::quantized(Arc::new(q), b.or(lin.bias.clone()), bf16);
                        continue;
                    }
                }
                let dt = lin.weight_tensor().map_or(DType::F32, |w| w.dtype());
                let w = if dt == DType::BF16 { w } else { w.to_dtype(dt)? };
                let b = match b {
                    Some(b) => Some(b.to_dtype(lin.bias.as_ref().map_or(DType::F32, |x| x.dtype()))?),
                    None => None,
                };
                *lin = if bf16_compute { Linear::bf16_compute(w, b)? } else { Linear::new(w, b)? };
            }
        }
        if bf16_compute {
            repack(lin)?;
        }
    }
    if merge {
        model.drop_originals();
    } else {
        model.restore_originals()?;
    }
    model.switch = Arc::new(AdapterSwitch::default());
    Ok(())
}

/// The adapters' tensors under PEFT's keys (`modules_to_save` copies of non-Linear parameters included,
/// `base_model.model.<name>`).
pub fn state(model: &crate::model::VlmModel) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> =
        crate::train::trainable_params(model).into_iter().map(|p| (p.name, p.var.as_tensor().detach())).collect();
    for (name, t) in model.saved_values()? {
        let key = format!("base_model.model.{name}");
        if !out.iter().any(|(k, _)| k == &key) {
            out.push((key, t));
        }
    }
    Ok(out)
}

/// Sets adapter tensors from PEFT keys. Every key must name an existing adapter tensor of the same
/// shape; with `strict`, every adapter tensor must be given.
pub fn load_state(model: &crate::model::VlmModel, tensors: &[(String, Tensor)], strict: bool) -> Result<()> {
    let params = crate::train::trainable_params(model);
    let saved = model.saved.names();
    for (name, t) in tensors {
        if let Some(s) = name.strip_prefix("base_model.model.").filter(|s| saved.iter().any(|n| n == s)) {
            model.set_saved_value(s, t)?; // shared with a session's tensor, if one trains it
            continue;
        }
        let Some(p) = params.iter().find(|p| &p.name == name) else {
            let module = name.trim_start_matches("base_model.model.");
            return input_err(format!("adapter tensor '{name}' does not match this model: no adapter on '{module}' (the adapter was made for another base model or config)"));
        };
        if p.var.dims() != t.dims() {
            return input_err(format!(
                "adapter tensor '{name}' has shape {:?}, this model's adapter expects {:?}",
                t.dims(),
                p.var.dims()
            ));
        }
        p.var.set(&t.to_dtype(DType::F32)?.to_device(p.var.device())?)?;
    }
    if strict {
        let keys = params.iter().map(|p| p.name.clone()).chain(saved.iter().map(|n| format!("base_model.model.{n}")));
        if let Some(k) = keys.into_iter().find(|k| !tensors.iter().any(|(n, _)| n == k)) {
            return input_err(format!("the adapter file lacks '{k}'"));
        }
    }
    Ok(())
}
