//! Key/value cache of the text model for incremental decoding.

use candle_core::{Result, Tensor};

/// Keys and values of one layer: [B, Hkv, S, hd] each (None before the first step).
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Appends new keys/values [B, Hkv, L, hd] and returns all of them [B, Hkv, S, hd].
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.kv {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache of every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![LayerCache::default(); num_layers] }
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    /// Number of cached positions.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Keeps batch rows `rows` (in that order, repeats allowed): beam search reordering.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            if let Some((k, v)) = &l.kv {
                l.kv = Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?));
            }
        }
        Ok(())
    }
}
