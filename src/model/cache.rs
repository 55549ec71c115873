//! Key/value cache of the text model for incremental decoding.
//!
//! Each layer keeps one buffer per K and V, `[B, Hkv, capacity, hd]`, allocated once (the capacity
//! is the generation's maximum length when known, [`KvCache::with_capacity`]; otherwise it doubles
//! when full) and written in place: a decoding step copies only its new keys and values, and
//! attention reads the first S positions through a view (`narrow`), without copying the past. Beam
//! reordering rewrites the live part of the buffers in place.

use candle_core::{Result, Tensor};

/// Keys and values of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// [B, Hkv, capacity, hd] each (None before the first append).
    kv: Option<(Tensor, Tensor)>,
    /// Positions written.
    len: usize,
    /// Positions to allocate at the first append (0: just what it brings).
    reserve: usize,
}

impl LayerCache {
    /// Writes new keys/values [B, Hkv, L, hd] after the cached ones and returns views of all of them
    /// [B, Hkv, S, hd] (S = past + L; rows of hd values contiguous, heads `capacity * hd` apart).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, hkv, l, hd) = k.dims4()?;
        let (kb, vb) = self.room(b, hkv, l, hd, k.dtype(), k.device())?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += l;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }

    /// The whole K and V buffers [B, Hkv, capacity, hd] (contiguous), with room for `l` more positions
    /// after the [`Self::len`] written ones (grown as [`Self::append`] grows them). A caller that writes
    /// positions `len .. len + l` itself (the decoding fast path) then calls [`Self::commit`].
    pub fn room(
        &mut self,
        b: usize,
        hkv: usize,
        l: usize,
        hd: usize,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let need = self.len + l;
        let cap = self.kv.as_ref().map_or(0, |(kb, _)| kb.dims()[2]);
        if need > cap {
            let new_cap = need.max(2 * cap).max(self.reserve);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, hkv, new_cap, hd), dtype, device)?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let (kb, vb) = match &self.kv {
                Some((kb, vb)) => (grow(Some(kb))?, grow(Some(vb))?),
                None => (grow(None)?, grow(None)?),
            };
            self.kv = Some((kb, vb));
        }
        let Some((kb, vb)) = &self.kv else { candle_core::bail!("kv cache: no buffer after allocation") };
        if kb.dims()[0] != b || kb.dims()[1] != hkv || kb.dims()[3] != hd || kb.dtype() != dtype {
            candle_core::bail!(
                "kv cache: new keys [{b}, {hkv}, {l}, {hd}] {dtype:?} do not fit the cache {:?}",
                kb.dims()
            );
        }
        Ok((kb.clone(), vb.clone()))
    }

    /// Counts `l` more positions as written (after [`Self::room`] and writing them).
    pub fn commit(&mut self, l: usize) {
        self.len = (self.len + l).min(self.capacity());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated positions.
    pub fn capacity(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Keeps batch rows `rows` (in that order, repeats allowed): beam expansion and reordering. The
    /// live positions are gathered once and written back into the buffers when the row count stays.
    fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        let Some((kb, vb)) = &self.kv else { return Ok(()) };
        let (b, cap, n) = (kb.dims()[0], kb.dims()[2], rows.dims1()?);
        if n == b && rows.to_vec1::<u32>()?.iter().enumerate().all(|(i, &r)| r as usize == i) {
            return Ok(()); // every row stays where it is
        }
        let pick = |buf: &Tensor| buf.narrow(2, 0, self.len)?.contiguous()?.index_select(rows, 0); // [n, Hkv, len, hd]
        let (k, v) = (pick(kb)?, pick(vb)?);
        if n == b {
            kb.slice_set(&k, 2, 0)?;
            vb.slice_set(&v, 2, 0)?;
        } else {
            let (len, reserve) = (self.len, cap);
            *self = LayerCache { kv: None, len: 0, reserve };
            if len > 0 {
                self.append(&k, &v)?;
            }
        }
        Ok(())
    }
}

/// The cache of every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache that allocates `positions` at once (e.g. the generation's `max_length`).
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        KvCache { layers: vec![LayerCache { kv: None, len: 0, reserve: positions }; num_layers] }
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    /// Number of cached positions.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Allocated positions.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::capacity)
    }

    /// Keeps batch rows `rows` (in that order, repeats allowed): beam search reordering.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.select_rows(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn kv(b: usize, l: usize, base: f32) -> Tensor {
        Tensor::arange(0f32, (b * 2 * l * 3) as f32, &Device::Cpu)
            .unwrap()
            .affine(1.0, base as f64)
            .unwrap()
            .reshape((b, 2, l, 3))
            .unwrap()
    }

    #[test]
    fn append_writes_in_place_and_equals_concatenation() {
        let mut c = KvCache::with_capacity(1, 8);
        let (a, b2, d) = (kv(2, 3, 0.0), kv(2, 1, 100.0), kv(2, 1, 200.0));
        c.layer_mut(0).append(&a, &a).unwrap();
        assert_eq!(c.capacity(), 8);
        c.layer_mut(0).append(&b2, &b2).unwrap();
        let (k, v) = c.layer_mut(0).append(&d, &d).unwrap();
        let want = Tensor::cat(&[&a, &b2, &d], 2).unwrap();
        assert_eq!(k.dims(), [2, 2, 5, 3]);
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            v.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(c.capacity(), 8, "no reallocation within the capacity");
        // past the capacity: doubles, keeps the values
        for i in 0..5 {
            c.layer_mut(0).append(&kv(2, 1, i as f32), &kv(2, 1, i as f32)).unwrap();
        }
        assert_eq!((c.seq_len(), c.capacity()), (10, 16));
    }

    #[test]
    fn select_rows_reorders_and_expands() {
        let mut c = KvCache::with_capacity(1, 6);
        let a = kv(2, 2, 0.0);
        c.layer_mut(0).append(&a, &a).unwrap();
        let idx = |r: &[u32]| Tensor::new(r, &Device::Cpu).unwrap();
        c.select_rows(&idx(&[1, 1])).unwrap(); // same row count: in place
        let (k, _) = c.layer_mut(0).append(&kv(2, 1, 9.0), &kv(2, 1, 9.0)).unwrap();
        let row1: Vec<f32> = a.i(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for r in 0..2 {
            let got: Vec<f32> = k.i(r).unwrap().narrow(1, 0, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, row1);
        }
        c.select_rows(&idx(&[0, 1, 1])).unwrap(); // expansion: 3 rows
        assert_eq!((c.seq_len(), c.capacity()), (3, 6));
        let (k, _) = c.layer_mut(0).append(&kv(3, 1, 0.0), &kv(3, 1, 0.0)).unwrap();
        assert_eq!(k.dims(), [3, 2, 4, 3]);
    }
}
