//! Connector features of frozen-vision frames, cached by frame content: while nothing in the vision
//! tower or connector trains, an image's features never change, so each distinct image goes through
//! the vision tower once per training run (not once per epoch, nor once per DPO completion).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use crate::error::{input_err, Result};
use crate::model::{Interrupt, VlmModel};

pub struct FeatureCache {
    map: Mutex<HashMap<u64, Tensor>>,
    /// Stop inserting beyond this many bytes of features.
    pub budget_bytes: usize,
    used: Mutex<usize>,
}

impl FeatureCache {
    pub fn new(budget_bytes: usize) -> Self {
        FeatureCache { map: Mutex::new(HashMap::new()), budget_bytes, used: Mutex::new(0) }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connector features [F_real, T, H] of the real frames of `pixel_values` [B, F, C, H, W], in order,
    /// like `VlmModel::image_features(..).connector`, computing only the frames not seen before.
    pub fn features(
        &self,
        model: &VlmModel,
        pixel_values: &Tensor,
        pixel_mask: Option<&[bool]>,
        interrupt: Interrupt,
    ) -> Result<Tensor> {
        let dims = pixel_values.dims().to_vec();
        if dims.len() != 5 {
            return input_err(format!(
                "pixel_values must be [batch, frames, channels, height, width], got shape {dims:?}"
            ));
        }
        let (b, f, c, h, w) = (dims[0], dims[1], dims[2], dims[3], dims[4]);
        if let Some(m) = pixel_mask {
            if m.len() != b * f * h * w {
                return input_err(format!(
                    "pixel_attention_mask has {} elements, expected [batch={b}, frames={f}, {h}, {w}]",
                    m.len()
                ));
            }
        }
        let flat: Vec<f32> = pixel_values.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (per, per_m) = (c * h * w, h * w);
        let mut keys = Vec::new(); // (frame index, key) of the real frames
        for i in 0..b * f {
            let fr = &flat[i * per..(i + 1) * per];
            if !fr.iter().any(|&v| v != 0.0) {
                continue;
            }
            let mut hs = DefaultHasher::new();
            (c, h, w).hash(&mut hs);
            fr.iter().for_each(|v| v.to_bits().hash(&mut hs));
            if let Some(m) = pixel_mask {
                m[i * per_m..(i + 1) * per_m].hash(&mut hs);
            }
            keys.push((i, hs.finish()));
        }
        if keys.is_empty() {
            return Ok(model.image_features(pixel_values, pixel_mask, interrupt)?.connector);
        }
        let mut missing: Vec<(usize, u64)> = Vec::new();
        {
            let map = self.map.lock().map_err(|_| crate::error::Error::Interrupted)?;
            for &(i, k) in &keys {
                if !map.contains_key(&k) && !missing.iter().any(|&(_, mk)| mk == k) {
                    missing.push((i, k));
                }
            }
        }
        let mut fresh: HashMap<u64, Tensor> = HashMap::new();
        if !missing.is_empty() {
            let idx: Vec<u32> = missing.iter().map(|&(i, _)| i as u32).collect();
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, pixel_values.device())?;
            let sub = pixel_values.reshape((b * f, c, h, w))?.index_select(&idx, 0)?.reshape((n, 1, c, h, w))?;
            let sub_mask: Option<Vec<bool>> = pixel_mask
                .map(|m| missing.iter().flat_map(|&(i, _)| m[i * per_m..(i + 1) * per_m].iter().copied()).collect());
            let feats = model.image_features(&sub, sub_mask.as_deref(), interrupt)?.connector; // [n, T, H]
            let mut map = self.map.lock().map_err(|_| crate::error::Error::Interrupted)?;
            let mut used = self.used.lock().map_err(|_| crate::error::Error::Interrupted)?;
            for (j, &(_, k)) in missing.iter().enumerate() {
                let t = feats.get(j)?; // [T, H]
                let bytes = t.elem_count() * t.dtype().size_in_bytes();
                if *used + bytes <= self.budget_bytes {
                    map.insert(k, t.clone());
                    *used += bytes;
                }
                fresh.insert(k, t);
            }
        }
        let map = self.map.lock().map_err(|_| crate::error::Error::Interrupted)?;
        let mut rows = Vec::with_capacity(keys.len());
        for (_, k) in &keys {
            match fresh.get(k).or_else(|| map.get(k)) {
                Some(t) => rows.push(t.clone()),
                None => return input_err("feature cache lost a frame (internal)".to_string()),
            }
        }
        Ok(Tensor::stack(&rows, 0)?)
    }
}
