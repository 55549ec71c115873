//! Writing GGUF files (version 3, little-endian), laid out as llama.cpp's and gguf-py's writers do:
//! header, metadata in insertion order, tensor infos, padding to the alignment, then each tensor's
//! data at an aligned offset (zero padding between tensors).

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::gguf::{checked_row_bytes, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use super::gguf_value::{GgufArray, GgufValue};
use crate::error::{CheckpointError, Error, InputError, Result};
use crate::quant::ggml::GgmlType;

fn bad(msg: String) -> Error {
    Error::Input(InputError::Invalid(msg))
}

struct PendingTensor {
    name: String,
    ty: GgmlType,
    /// Outermost first, as given.
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A GGUF file being assembled: metadata and tensors, written by [`GgufWriter::write_to_path`].
pub struct GgufWriter {
    alignment: usize,
    metadata: Vec<(String, GgufValue)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty file with the default alignment (32; `general.alignment` is then not written).
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// Another alignment (a power of two), written as `general.alignment` (UINT32).
    pub fn with_alignment(mut self, alignment: u32) -> Result<Self> {
        if !alignment.is_power_of_two() {
            return Err(bad(format!("GGUF alignment {alignment} is not a power of two")));
        }
        self.alignment = alignment as usize;
        self.add_metadata("general.alignment", GgufValue::U32(alignment))?;
        Ok(self)
    }

    /// Adds `key` (once per key), written in the order added.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> Result<()> {
        let key = key.into();
        if !self.keys.insert(key.clone()) {
            return Err(bad(format!("GGUF metadata key '{key}' added twice")));
        }
        self.metadata.push((key, value));
        Ok(())
    }

    /// Adds a tensor: `shape` outermost first (`[out, in]` for a Linear weight; written reversed
    /// as ggml's `ne`), `data` the rows in `ty`'s encoding, exactly the tensor's byte size.
    pub fn add_tensor(&mut self, name: impl Into<String>, ty: GgmlType, shape: &[usize], data: Vec<u8>) -> Result<()> {
        let name = name.into();
        if shape.len() > MAX_DIMS {
            return Err(bad(format!("GGUF tensor '{name}': {} dimensions (at most {MAX_DIMS})", shape.len())));
        }
        let row = shape.last().copied().unwrap_or(1);
        let row_bytes = checked_row_bytes(ty, row).ok_or_else(|| {
            bad(format!(
                "GGUF tensor '{name}': row length {row} is not a multiple of the {} block size {}",
                ty.name(),
                ty.block_size()
            ))
        })?;
        let outer = shape.iter().rev().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d));
        let expected = outer.and_then(|o| o.checked_mul(row_bytes));
        if expected != Some(data.len()) {
            return Err(bad(format!(
                "GGUF tensor '{name}': {} {shape:?} takes {} bytes, {} given",
                ty.name(),
                expected.map_or("too many".into(), |e| e.to_string()),
                data.len()
            )));
        }
        if !self.names.insert(name.clone()) {
            return Err(bad(format!("GGUF tensor '{name}' added twice")));
        }
        self.tensors.push(PendingTensor { name, ty, shape: shape.to_vec(), data });
        Ok(())
    }

    /// Writes the whole file to `w`.
    pub fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&(t.ty as u32).to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.data.len().div_ceil(self.alignment) * self.alignment;
        }
        let zeros = vec![0u8; self.alignment];
        let pad = |len: usize| &zeros[..(self.alignment - len % self.alignment) % self.alignment];
        w.write_all(&head)?;
        w.write_all(pad(head.len()))?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(pad(t.data.len()))?;
        }
        Ok(())
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write(&mut out);
        out
    }

    /// Writes the file at `path` (created or truncated).
    pub fn write_to_path(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |e: std::io::Error| CheckpointError::Io { file: path.to_path_buf(), msg: e.to_string() };
        let f = std::fs::File::create(path).map_err(io)?;
        let mut w = BufWriter::new(f);
        self.write(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
        Ok(())
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(a) => put_array(out, a),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::U16(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I16(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| put_string(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
        GgufArray::U64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
}
