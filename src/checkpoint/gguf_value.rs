//! GGUF metadata values: the thirteen value types of the key/value section, arrays (nested ones
//! included) kept as typed vectors, and checked conversions that say what was expected and found.

use std::fmt;

/// A GGUF value type, with its id in the file (gguf-py's `GGUFValueType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// The type with id `id`, if there is one.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64].into_iter().find(|t| *t as u32 == id)
    }

    /// gguf-py's name of the type ("UINT32", "STRING", ...).
    pub fn name(self) -> &'static str {
        match self {
            GgufValueType::U8 => "UINT8",
            GgufValueType::I8 => "INT8",
            GgufValueType::U16 => "UINT16",
            GgufValueType::I16 => "INT16",
            GgufValueType::U32 => "UINT32",
            GgufValueType::I32 => "INT32",
            GgufValueType::F32 => "FLOAT32",
            GgufValueType::Bool => "BOOL",
            GgufValueType::String => "STRING",
            GgufValueType::Array => "ARRAY",
            GgufValueType::U64 => "UINT64",
            GgufValueType::I64 => "INT64",
            GgufValueType::F64 => "FLOAT64",
        }
    }

    /// The fewest bytes one value of this type takes in a file (a string is at least its length,
    /// an array at least its element type and count). Bounds counts read from a file.
    pub fn min_size(self) -> usize {
        match self {
            GgufValueType::U8 | GgufValueType::I8 | GgufValueType::Bool => 1,
            GgufValueType::U16 | GgufValueType::I16 => 2,
            GgufValueType::U32 | GgufValueType::I32 | GgufValueType::F32 => 4,
            GgufValueType::U64 | GgufValueType::I64 | GgufValueType::F64 | GgufValueType::String => 8,
            GgufValueType::Array => 12,
        }
    }
}

/// An array value: one typed vector per element type. An array of arrays keeps each inner array's
/// own element type, as the file does.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufArray {
    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer elements as i64 (u64 values above i64::MAX give `None` for that element), or `None`
    /// when the elements are not integers.
    pub fn ints(&self) -> Option<Vec<Option<i64>>> {
        Some(match self {
            GgufArray::U8(v) => v.iter().map(|&x| Some(x as i64)).collect(),
            GgufArray::I8(v) => v.iter().map(|&x| Some(x as i64)).collect(),
            GgufArray::U16(v) => v.iter().map(|&x| Some(x as i64)).collect(),
            GgufArray::I16(v) => v.iter().map(|&x| Some(x as i64)).collect(),
            GgufArray::U32(v) => v.iter().map(|&x| Some(x as i64)).collect(),
            GgufArray::I32(v) => v.iter().map(|&x| Some(x as i64)).collect(),
            GgufArray::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect(),
            GgufArray::I64(v) => v.iter().map(|&x| Some(x)).collect(),
            _ => return None,
        })
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// What a metadata value was asked to be and what it is: the caller adds the key and file.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeMismatch {
    pub expected: &'static str,
    pub found: String,
}

impl fmt::Display for TypeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected {}, found {}", self.expected, self.found)
    }
}

impl GgufValue {
    /// The value type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// "UINT32 4", "STRING", "ARRAY of 3 STRING": what a mismatch error shows as found.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::String(_) => "STRING".into(),
            GgufValue::Array(a) => format!("ARRAY of {} {}", a.len(), a.elem_type().name()),
            other => format!("{} {}", other.value_type().name(), other.scalar_text()),
        }
    }

    fn scalar_text(&self) -> String {
        match self {
            GgufValue::U8(x) => x.to_string(),
            GgufValue::I8(x) => x.to_string(),
            GgufValue::U16(x) => x.to_string(),
            GgufValue::I16(x) => x.to_string(),
            GgufValue::U32(x) => x.to_string(),
            GgufValue::I32(x) => x.to_string(),
            // {:?}: 1e300 stays short, NaN reads NaN.
            GgufValue::F32(x) => format!("{x:?}"),
            GgufValue::Bool(x) => x.to_string(),
            GgufValue::U64(x) => x.to_string(),
            GgufValue::I64(x) => x.to_string(),
            GgufValue::F64(x) => format!("{x:?}"),
            GgufValue::String(_) | GgufValue::Array(_) => String::new(),
        }
    }

    fn mismatch(&self, expected: &'static str) -> TypeMismatch {
        TypeMismatch { expected, found: self.describe() }
    }

    /// Any integer type, as i128 (so every stored integer fits).
    fn integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(x) => x as i128,
            GgufValue::I8(x) => x as i128,
            GgufValue::U16(x) => x as i128,
            GgufValue::I16(x) => x as i128,
            GgufValue::U32(x) => x as i128,
            GgufValue::I32(x) => x as i128,
            GgufValue::U64(x) => x as i128,
            GgufValue::I64(x) => x as i128,
            _ => return None,
        })
    }

    /// An integer of any width whose value fits a u32.
    pub fn as_u32(&self) -> Result<u32, TypeMismatch> {
        self.integer().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| self.mismatch("an integer in 0..=4294967295"))
    }

    /// An integer of any width whose value fits a u64.
    pub fn as_u64(&self) -> Result<u64, TypeMismatch> {
        self.integer().and_then(|x| u64::try_from(x).ok()).ok_or_else(|| self.mismatch("a non-negative integer"))
    }

    /// An integer of any width whose value fits a usize.
    pub fn as_usize(&self) -> Result<usize, TypeMismatch> {
        self.integer().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| self.mismatch("a non-negative integer"))
    }

    /// An integer of any width whose value fits an i64.
    pub fn as_i64(&self) -> Result<i64, TypeMismatch> {
        self.integer().and_then(|x| i64::try_from(x).ok()).ok_or_else(|| self.mismatch("an integer"))
    }

    /// FLOAT32 or FLOAT64, widened to f64 (an f32 keeps its exact value, as numpy does).
    pub fn as_f64(&self) -> Result<f64, TypeMismatch> {
        match *self {
            GgufValue::F32(x) => Ok(x as f64),
            GgufValue::F64(x) => Ok(x),
            _ => Err(self.mismatch("FLOAT32 or FLOAT64")),
        }
    }

    pub fn as_bool(&self) -> Result<bool, TypeMismatch> {
        match *self {
            GgufValue::Bool(x) => Ok(x),
            _ => Err(self.mismatch("BOOL")),
        }
    }

    pub fn as_str(&self) -> Result<&str, TypeMismatch> {
        match self {
            GgufValue::String(s) => Ok(s),
            _ => Err(self.mismatch("STRING")),
        }
    }

    pub fn as_array(&self) -> Result<&GgufArray, TypeMismatch> {
        match self {
            GgufValue::Array(a) => Ok(a),
            _ => Err(self.mismatch("ARRAY")),
        }
    }

    /// An array of strings.
    pub fn as_str_array(&self) -> Result<&[String], TypeMismatch> {
        match self {
            GgufValue::Array(GgufArray::String(v)) => Ok(v),
            _ => Err(self.mismatch("ARRAY of STRING")),
        }
    }

    /// An array of integers (any width), each as i64.
    pub fn as_int_array(&self) -> Result<Vec<i64>, TypeMismatch> {
        let ints = match self {
            GgufValue::Array(a) => a.ints(),
            _ => None,
        };
        ints.and_then(|v| v.into_iter().collect::<Option<Vec<i64>>>()).ok_or_else(|| self.mismatch("ARRAY of integers"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in 0..13 {
            assert_eq!(GgufValueType::from_id(id).map(|t| t as u32), Some(id));
        }
        assert_eq!(GgufValueType::from_id(13), None);
    }

    #[test]
    fn integer_getters_accept_any_width_that_fits() {
        assert_eq!(GgufValue::U64(30).as_u32(), Ok(30));
        assert_eq!(GgufValue::I8(3).as_usize(), Ok(3));
        let e = GgufValue::I32(-1).as_u32().unwrap_err();
        assert_eq!(e.found, "INT32 -1");
        let e = GgufValue::String("x".into()).as_u64().unwrap_err();
        assert_eq!(e.to_string(), "expected a non-negative integer, found STRING");
        assert_eq!(GgufValue::U64(u64::MAX).as_i64().unwrap_err().expected, "an integer");
    }

    #[test]
    fn float_bool_string_and_array_getters() {
        assert_eq!(GgufValue::F32(1e-5).as_f64(), Ok(1e-5f32 as f64));
        assert!(GgufValue::U32(1).as_f64().is_err());
        assert_eq!(GgufValue::F64(1e300).as_u64().unwrap_err().found, "FLOAT64 1e300");
        assert_eq!(GgufValue::Bool(true).as_bool(), Ok(true));
        let a = GgufValue::Array(GgufArray::String(vec!["a".into(), "b".into()]));
        assert_eq!(a.as_str_array().unwrap().len(), 2);
        assert_eq!(a.as_int_array().unwrap_err().found, "ARRAY of 2 STRING");
        let t = GgufValue::Array(GgufArray::I32(vec![1, 3]));
        assert_eq!(t.as_int_array(), Ok(vec![1, 3]));
        assert!(t.as_str().is_err());
    }
}
