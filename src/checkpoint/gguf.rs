//! GGUF files (llama.cpp's format), read over a memory map: versions 2 and 3, little-endian.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the metadata
//! (key string, u32 value type, value), the tensor infos (name, u32 n_dims, u64 dims innermost
//! first, u32 ggml type, u64 offset), padding to `general.alignment` (default 32), then the tensor
//! data, each tensor at its offset from the start of the data section. Strings are a u64 length
//! and UTF-8 bytes; an array is a u32 element type, a u64 count and the elements.
//!
//! Everything is validated before use, so that no count, length or offset read from a file can
//! make us read out of bounds or allocate more than a small multiple of the file size.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::gguf_value::{GgufArray, GgufValue, GgufValueType};
use crate::error::CheckpointError;
use crate::quant::ggml::{dequantize_row, GgmlType};

/// The first four bytes of a GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// Deepest array-of-arrays nesting we read (llama.cpp reads none; this only bounds recursion).
pub const MAX_NESTING: usize = 8;

/// One tensor's entry in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml's `ne`: dims[0] is the innermost (row) length.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: usize,
    /// Bytes of data.
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// The shape outermost first (numpy's / PyTorch's order): `[out, in]` for a Linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Values per row (`dims[0]`; 1 for a 0-d tensor).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (the product of the outer dims).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }

    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        checked_row_bytes(self.ty, self.row_len()).unwrap_or(0)
    }
}

/// A tensor's data as stored, with its type and shape (outermost first).
#[derive(Debug, Clone, Copy)]
pub struct GgufTensor<'a> {
    pub info: &'a GgufTensorInfo,
    pub data: &'a [u8],
}

enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: its metadata in file order and its tensor infos, over the file's bytes.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CheckpointError::NotFound { path: path.to_path_buf(), hint: String::new() },
            _ => CheckpointError::Io { file: path.to_path_buf(), msg: e.to_string() },
        })?;
        // SAFETY: the mapping is read-only; a file rewritten while we read it is outside our contract
        // (the same as for safetensors, gguf-py and llama.cpp, which all map GGUF files).
        let mmap = unsafe { Mmap::map(&f) }
            .map_err(|e| CheckpointError::Io { file: path.to_path_buf(), msg: e.to_string() })?;
        Self::parse(Storage::Mmap(mmap), path)
    }

    /// Parses a file held in memory; `path` only names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        Self::parse(Storage::Owned(bytes), path.as_ref())
    }

    fn parse(storage: Storage, path: &Path) -> Result<Self, CheckpointError> {
        let b = storage.bytes();
        let mut c = Cursor { b, pos: 0, file: path };
        let magic = c.take(4, "the magic")?;
        if magic != GGUF_MAGIC {
            return Err(c.corrupt(format!("bad magic {magic:02x?} (a GGUF file starts with \"GGUF\")")));
        }
        let version = c.u32("the version")?;
        if version & 0xFFFF == 0 && version != 0 {
            return Err(c.unsupported(format!(
                "byte order: version field {version:#x} looks big-endian (only little-endian files are read)"
            )));
        }
        if version != 2 && version != 3 {
            return Err(c.unsupported(format!("version {version} (only versions 2 and 3 are read)")));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        // Each entry takes at least a key length, a type and one byte; each tensor info at least a
        // name length, n_dims, a type and an offset.
        let n_kv = c.count(n_kv, 8 + 4 + 1, "metadata entries")?;
        let n_tensors = c.count(n_tensors, 8 + 4 + 4 + 8, "tensor infos")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&format!("the key of metadata entry #{i}"))?;
            let ty = c.u32(&format!("the value type of metadata '{key}'"))?;
            let ty = GgufValueType::from_id(ty)
                .ok_or_else(|| c.corrupt(format!("metadata '{key}': unknown value type id {ty}")))?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.corrupt(format!("metadata key '{key}' appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as usize,
            Some(GgufValue::U32(a)) => {
                return Err(c.corrupt(format!("general.alignment is {a}: it must be a non-zero power of two")))
            }
            Some(other) => {
                return Err(CheckpointError::GgufMetadata {
                    file: path.to_path_buf(),
                    key: "general.alignment".into(),
                    expected: "UINT32".into(),
                    found: other.describe(),
                })
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let info = c.tensor_info(i, alignment)?;
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(c.corrupt(format!("tensor '{}' appears twice", info.name)));
            }
            tensors.push(info);
        }
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > b.len()) {
                return Err(c.corrupt(format!(
                    "tensor '{}' ({} {:?}, {} bytes at offset {} of the data section, which starts at byte {}) \
                     ends past the end of the file ({} bytes)",
                    t.name,
                    t.ty.name(),
                    t.shape(),
                    t.n_bytes,
                    t.offset,
                    data_offset,
                    b.len()
                )));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            storage,
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Where the data section starts in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The metadata in file order.
    pub fn metadata_entries(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The value of `key`, or a [`CheckpointError::GgufMetadata`] saying it is missing.
    pub fn require(&self, key: &str, expected: &str) -> Result<&GgufValue, CheckpointError> {
        self.metadata(key).ok_or_else(|| CheckpointError::GgufMetadata {
            file: self.path.clone(),
            key: key.into(),
            expected: expected.into(),
            found: "nothing (the key is absent)".into(),
        })
    }

    /// Runs a typed getter on `key` (absent: `Ok(None)`), naming the key and file on a mismatch.
    pub fn get_opt<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a GgufValue) -> Result<T, super::gguf_value::TypeMismatch>,
    ) -> Result<Option<T>, CheckpointError> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => get(v).map(Some).map_err(|m| CheckpointError::GgufMetadata {
                file: self.path.clone(),
                key: key.into(),
                expected: m.expected.into(),
                found: m.found,
            }),
        }
    }

    /// Like [`Self::get_opt`] for a key that must be present.
    pub fn get<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a GgufValue) -> Result<T, super::gguf_value::TypeMismatch>,
    ) -> Result<T, CheckpointError> {
        let v = self.require(key, "a value")?;
        get(v).map_err(|m| CheckpointError::GgufMetadata {
            file: self.path.clone(),
            key: key.into(),
            expected: m.expected.into(),
            found: m.found,
        })
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, CheckpointError> {
        self.get(key, GgufValue::as_str)
    }

    /// An integer value that fits a usize.
    pub fn get_usize(&self, key: &str) -> Result<usize, CheckpointError> {
        self.get(key, GgufValue::as_usize)
    }

    /// A FLOAT32 / FLOAT64 value.
    pub fn get_f64(&self, key: &str) -> Result<f64, CheckpointError> {
        self.get(key, GgufValue::as_f64)
    }

    /// The tensor infos in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// `name`'s type, shape and stored bytes.
    pub fn tensor(&self, name: &str) -> Result<GgufTensor<'_>, CheckpointError> {
        let info = self.tensor_info(name).ok_or_else(|| CheckpointError::MissingTensor {
            name: name.into(),
            files: self.path.display().to_string(),
        })?;
        Ok(GgufTensor { info, data: self.data(info) })
    }

    /// The stored bytes of a tensor of this file (validated inside the file when parsing).
    pub fn data(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = self.data_offset + info.offset;
        self.storage.bytes().get(start..start + info.n_bytes).unwrap_or(&[])
    }

    /// `name` decoded to f32, rows in file order (`info.n_elements()` values).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let t = self.tensor(name)?;
        if t.info.n_elements() == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<usize> = (0..t.info.n_rows()).collect();
        Ok(dequantize_rows(t.info, t.data, &rows))
    }

    /// Lets the kernel drop the mapped pages of `info` (they are re-read if touched again): after a
    /// tensor is decoded, the process then holds only the decoded copy.
    pub fn release(&self, info: &GgufTensorInfo) {
        #[cfg(unix)]
        if let Storage::Mmap(m) = &self.storage {
            // SAFETY: a read-only, file-backed mapping; DONTNEED only discards pages, which are re-read
            // from the file if touched again. No reference into this range is used by this call.
            let _ = unsafe {
                m.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.data_offset + info.offset,
                    info.n_bytes,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

/// Decodes the rows `order` of a tensor (stored data `data`) to f32, one after the other:
/// output row `i` is stored row `order[i]`. Every index must be below `info.n_rows()`.
pub fn dequantize_rows(info: &GgufTensorInfo, data: &[u8], order: &[usize]) -> Vec<f32> {
    let (n, rb) = (info.row_len(), info.row_bytes());
    let mut out = vec![0f32; order.len() * n];
    if n == 0 {
        return out;
    }
    out.par_chunks_exact_mut(n).zip(order.par_iter()).for_each(|(dst, &r)| {
        dequantize_row(info.ty, &data[r * rb..(r + 1) * rb], dst);
    });
    out
}

/// Bytes of a row of `n` values of `ty`: `None` when `n` is not whole blocks or the size overflows.
pub fn checked_row_bytes(ty: GgmlType, n: usize) -> Option<usize> {
    n.is_multiple_of(ty.block_size()).then(|| (n / ty.block_size()).checked_mul(ty.type_size())).flatten()
}

/// A read position over the file, with errors that say what was being read.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, msg: String) -> CheckpointError {
        CheckpointError::Gguf { file: self.file.to_path_buf(), msg }
    }

    fn unsupported(&self, what: String) -> CheckpointError {
        CheckpointError::GgufUnsupported { file: self.file.to_path_buf(), what }
    }

    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CheckpointError> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "truncated: reading {what} at byte {} needs {n} bytes, only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], CheckpointError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `n` items of at least `min_size` bytes each must fit in the rest of the file.
    fn count(&self, n: u64, min_size: usize, what: &str) -> Result<usize, CheckpointError> {
        let fits = usize::try_from(n).ok().filter(|&n| n <= self.remaining() / min_size);
        fits.ok_or_else(|| {
            self.corrupt(format!(
                "{n} {what} cannot fit in the {} bytes left after byte {} (each takes at least {min_size})",
                self.remaining(),
                self.pos
            ))
        })
    }

    fn string(&mut self, what: &str) -> Result<String, CheckpointError> {
        let n = self.u64(&format!("the length of {what}"))?;
        let n = usize::try_from(n).ok().filter(|&n| n <= self.remaining()).ok_or_else(|| {
            self.corrupt(format!(
                "{what}: string length {n} at byte {} runs past the end of the file ({} bytes left)",
                self.pos - 8,
                self.remaining()
            ))
        })?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|e| self.corrupt(format!("{what}: not valid UTF-8 ({e})")))
    }

    fn value(&mut self, ty: GgufValueType, key: &str, depth: usize) -> Result<GgufValue, CheckpointError> {
        let what = || format!("the value of metadata '{key}'");
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(&what())?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>(&what())?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(&what())?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(&what())?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(&what())?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(&what())?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(&what())?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(&what())?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(&what())?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(&what())?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool(key)?),
            GgufValueType::String => GgufValue::String(self.string(&what())?),
            GgufValueType::Array => GgufValue::Array(self.array_value(key, depth)?),
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool, CheckpointError> {
        match self.array::<1>(&format!("the value of metadata '{key}'"))?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.corrupt(format!("metadata '{key}': BOOL byte {b} is neither 0 nor 1"))),
        }
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<GgufArray, CheckpointError> {
        if depth >= MAX_NESTING {
            return Err(self.unsupported(format!("metadata '{key}': arrays nested more than {MAX_NESTING} deep")));
        }
        let id = self.u32(&format!("the element type of metadata '{key}'"))?;
        let ty = GgufValueType::from_id(id)
            .ok_or_else(|| self.corrupt(format!("metadata '{key}': unknown array element type id {id}")))?;
        let n = self.u64(&format!("the length of metadata '{key}'"))?;
        let n = self.count(n, ty.min_size(), &format!("elements of type {} in metadata '{key}'", ty.name()))?;
        fn fixed<const N: usize, T>(
            c: &mut Cursor<'_>,
            n: usize,
            key: &str,
            f: impl Fn([u8; N]) -> T,
        ) -> Result<Vec<T>, CheckpointError> {
            let bytes = c.take(n * N, &format!("the elements of metadata '{key}'"))?;
            Ok(bytes
                .chunks_exact(N)
                .map(|ch| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(ch);
                    f(a)
                })
                .collect())
        }
        Ok(match ty {
            GgufValueType::U8 => GgufArray::U8(fixed(self, n, key, |[b]| b)?),
            GgufValueType::I8 => GgufArray::I8(fixed(self, n, key, |[b]| b as i8)?),
            GgufValueType::U16 => GgufArray::U16(fixed(self, n, key, u16::from_le_bytes)?),
            GgufValueType::I16 => GgufArray::I16(fixed(self, n, key, i16::from_le_bytes)?),
            GgufValueType::U32 => GgufArray::U32(fixed(self, n, key, u32::from_le_bytes)?),
            GgufValueType::I32 => GgufArray::I32(fixed(self, n, key, i32::from_le_bytes)?),
            GgufValueType::F32 => GgufArray::F32(fixed(self, n, key, f32::from_le_bytes)?),
            GgufValueType::U64 => GgufArray::U64(fixed(self, n, key, u64::from_le_bytes)?),
            GgufValueType::I64 => GgufArray::I64(fixed(self, n, key, i64::from_le_bytes)?),
            GgufValueType::F64 => GgufArray::F64(fixed(self, n, key, f64::from_le_bytes)?),
            GgufValueType::Bool => GgufArray::Bool((0..n).map(|_| self.bool(key)).collect::<Result<_, _>>()?),
            GgufValueType::String => GgufArray::String(
                (0..n).map(|i| self.string(&format!("metadata '{key}'[{i}]"))).collect::<Result<_, _>>()?,
            ),
            GgufValueType::Array => {
                GgufArray::Array((0..n).map(|_| self.array_value(key, depth + 1)).collect::<Result<_, _>>()?)
            }
        })
    }

    fn tensor_info(&mut self, i: usize, alignment: usize) -> Result<GgufTensorInfo, CheckpointError> {
        let name = self.string(&format!("the name of tensor #{i}"))?;
        let n_dims = self.u32(&format!("the dimension count of tensor '{name}'"))? as usize;
        if n_dims > MAX_DIMS {
            return Err(self.corrupt(format!("tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            let v = self.u64(&format!("dimension {d} of tensor '{name}'"))?;
            // ggml stores ne as int64.
            let v = usize::try_from(v)
                .ok()
                .filter(|&v| v <= i64::MAX as usize)
                .ok_or_else(|| self.corrupt(format!("tensor '{name}': dimension {d} is {v}, too large")))?;
            dims.push(v);
        }
        let id = self.u32(&format!("the type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            let names: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
            self.unsupported(format!("tensor type: tensor '{name}' has ggml type id {id} (read: {})", names.join(", ")))
        })?;
        let offset = self.u64(&format!("the data offset of tensor '{name}'"))?;
        let offset = usize::try_from(offset)
            .map_err(|_| self.corrupt(format!("tensor '{name}': data offset {offset} is too large")))?;
        if !offset.is_multiple_of(alignment) {
            return Err(self.corrupt(format!(
                "tensor '{name}': data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(ty.block_size()) {
            return Err(self.corrupt(format!(
                "tensor '{name}': row length {row} is not a multiple of the {} block size {}",
                ty.name(),
                ty.block_size()
            )));
        }
        let row_bytes = checked_row_bytes(ty, row);
        let n_bytes = row_bytes.and_then(|r| dims.iter().skip(1).try_fold(r, |a, &d| a.checked_mul(d)));
        let n_elements = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let n_rows = dims.iter().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d));
        let (Some(n_bytes), Some(_), Some(_)) = (n_bytes, n_elements, n_rows) else {
            return Err(self.corrupt(format!("tensor '{name}': dimensions {dims:?} overflow")));
        };
        Ok(GgufTensorInfo { name, dims, ty, offset, n_bytes })
    }
}
